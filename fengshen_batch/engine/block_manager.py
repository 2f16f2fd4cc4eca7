"""Which KV blocks each sequence holds: a free list, reference counts, and prefix caching by block hash.

Plain Python, like the scheduler that asks it: no tensors. A prompt is cut into blocks of BLOCK tokens; each
full block gets a chained hash (its tokens and the hash of the blocks before it), as vLLM and nano-vllm hash
theirs, so one dictionary lookup per block finds the longest cached prefix.

- A request's prompt blocks are shared by reference by its n samples; cached blocks are shared with every
  other prompt that starts with the same tokens. A shared block is never written: the first write into a
  block that others hold (a sample's first token after a prompt that ends mid-block) copies it first
  (copy on write, `append`).
- A block is registered (findable) once its K/V is written (`register`, after a prefill step), and stays
  findable after its sequences end, in the free list (least recently freed first), until it is handed out
  for other tokens: a prefix outlives the sequence that computed it and never evicts running work.
- Only full prompt blocks are registered, and decode writes only past the prompt: a registered block's K/V is
  never overwritten while it is findable. A match is confirmed against the block's own tokens and its parent
  block (id and generation), so a hash collision costs a hit, never an output.

K/V at a position depends only on the tokens up to it (GPT2's absolute positions), so a cached block is exact
for any prompt that starts with the same tokens, whichever sequence computed it.
"""

from __future__ import annotations

from .kv_cache import BLOCK, NULL_BLOCK


def block_hashes(tokens: list[int]) -> list[int]:
    """Chained hashes of the full blocks of `tokens`: entry i covers tokens[: (i + 1) * BLOCK]."""
    hashes, prev = [], 0
    for end in range(BLOCK, len(tokens) + 1, BLOCK):
        prev = hash((prev, *tokens[end - BLOCK : end]))
        hashes.append(prev)
    return hashes


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK)


def cacheable_blocks(prompt_tokens: int) -> int:
    """Leading blocks of a prompt the cache may supply: all but the block of its last token, whose logits
    start the generation and so are always computed."""
    return (prompt_tokens - 1) // BLOCK


class BlockManager:
    """Blocks 1..num_blocks-1 (block 0 is the null block), their holders and the prefix index."""

    def __init__(self, num_blocks: int, prefix_caching: bool = False):
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least one block besides the null block")
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self.ref = [0] * num_blocks
        self.gen = [0] * num_blocks  # bumped each time a block is handed out for other tokens
        # The free list in order of reuse (an ordered set): never-used blocks first, then freed ones, oldest first.
        self.free: dict[int, None] = dict.fromkeys(range(1, num_blocks))
        self.by_hash: dict[int, int] = {}  # chained hash -> the block holding it
        # block -> (its hash, its tokens, parent block, parent's generation) while registered
        self.key: dict[int, tuple[int, tuple[int, ...], int, int]] = {}

    @property
    def free_count(self) -> int:
        return len(self.free)

    def cached(self, prompt: list[int], hashes: list[int]) -> list[int]:
        """The blocks holding the longest cached prefix of `prompt` (at most its `cacheable_blocks`)."""
        if not self.prefix_caching:
            return []
        out: list[int] = []
        parent, parent_gen = NULL_BLOCK, 0
        for i, h in enumerate(hashes[: cacheable_blocks(len(prompt))]):
            block = self.by_hash.get(h)
            if block is None:
                break
            tokens = tuple(prompt[i * BLOCK : (i + 1) * BLOCK])
            if self.key.get(block) != (h, tokens, parent, parent_gen):  # a collision: no hit
                break
            out.append(block)
            parent, parent_gen = block, self.gen[block]
        return out

    def can_allocate(self, cached: list[int], new: int) -> bool:
        """Whether `new` fresh blocks can be had once the `cached` ones (some maybe free) are taken."""
        return self.free_count - sum(1 for b in cached if self.ref[b] == 0) >= new

    def allocate(self, cached: list[int], new: int, holders: int) -> list[int]:
        """A table of the `cached` blocks then `new` fresh ones, each held `holders` times (a request's n
        samples). The caller checked `can_allocate`."""
        for b in cached:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += holders
        table = list(cached)
        for _ in range(new):
            b = self._take()
            self.ref[b] = holders
            table.append(b)
        return table

    def _take(self) -> int:
        """A free block handed out for new tokens: whatever it held is forgotten."""
        b = next(iter(self.free))
        del self.free[b]
        self._unregister(b)
        self.gen[b] += 1
        return b

    def _unregister(self, b: int) -> None:
        key = self.key.pop(b, None)
        if key is not None and self.by_hash.get(key[0]) == b:
            del self.by_hash[key[0]]

    def register(self, table: list[int], prompt: list[int], hashes: list[int], end: int) -> None:
        """The K/V of prompt[:end] is written in `table`'s blocks: its full blocks become findable."""
        if not self.prefix_caching:
            return
        parent = NULL_BLOCK
        for i in range(end // BLOCK):
            b, h = table[i], hashes[i]
            if b not in self.key:
                if h in self.by_hash:  # another block of the same step computed it first: that one is found
                    return
                self.by_hash[h] = b
                self.key[b] = (h, tuple(prompt[i * BLOCK : (i + 1) * BLOCK]), parent, self.gen[parent])
            parent = b

    def append(self, table: list[int], position: int) -> tuple[int, int] | None | bool:
        """Make `table` ready to take a token at `position`: a fresh block past its end, or its own copy of a
        shared block. Returns the copy to make first (source, destination), True when nothing is to copy,
        or None when no block is free (the caller preempts)."""
        i = position // BLOCK
        if i == len(table):
            if not self.free:
                return None
            b = self._take()
            self.ref[b] = 1
            table.append(b)
            return True
        b = table[i]
        if self.ref[b] == 1:
            return True
        if not self.free:
            return None
        new = self._take()
        self.ref[new] = 1
        self.ref[b] -= 1
        table[i] = new
        return (b, new)

    def release(self, table: list[int]) -> None:
        """A holder lets go of its blocks; a block nobody holds joins the end of the free list (its K/V, and
        so its registration, intact)."""
        for b in table:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
        table.clear()
