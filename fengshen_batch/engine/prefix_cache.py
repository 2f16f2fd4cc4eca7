"""Which cache slots hold which prompt prefixes: automatic prefix caching over the slot KV cache.

Plain Python, like the scheduler that asks it: no tensors. A prompt is cut into blocks of `BLOCK` tokens and
each full block gets a chained hash (its tokens and the hash of the blocks before it), as vLLM and nano-vllm
hash theirs, so one dictionary lookup per block finds the longest cached prefix: O(prompt / BLOCK).

A slot holds the blocks of the prompt it was last given, for as long as their K/V is intact:
- while its sequence runs (decode writes only at positions past the prompt, and scratch at the last position,
  which no prompt reaches), and after the sequence ends: a freed slot keeps its K/V and its entries until it
  is handed out again, so a prefix outlives the sequence that computed it and never evicts running work;
- a slot handed out keeps the blocks below the position its new prefill starts at and drops the rest;
- blocks are registered only once their K/V is written (the scheduler calls `register` after a prefill step),
  so a lookup never finds K/V that a copy or a prefill of the same step has yet to produce;
- a failed step drops every slot that was in use (`drop`): what it half wrote is never read.

K/V at a position depends only on the tokens up to it (GPT2's absolute positions), so a slot's prefix is
exact for any prompt that starts with the same tokens, whichever sequence computed it. The hash chain is only
a lookup: a match is confirmed against the slot's tokens, so a hash collision can cost a hit, never an output.
"""

from __future__ import annotations

from dataclasses import dataclass

BLOCK = 16  # tokens per hashed block (vLLM's default block size)


def block_hashes(tokens: list[int]) -> list[int]:
    """Chained hashes of the full blocks of `tokens`: entry i covers tokens[: (i + 1) * BLOCK]."""
    hashes, prev = [], 0
    for end in range(BLOCK, len(tokens) + 1, BLOCK):
        prev = hash((prev, *tokens[end - BLOCK : end]))
        hashes.append(prev)
    return hashes


@dataclass(frozen=True)
class Placement:
    """Where an admitted prompt goes: its slot, how much of it is cached there once `copy` is done, and the
    copy that brings it there (from another slot holding a longer prefix), if any."""

    slot: int
    start: int  # prompt tokens already in the slot after the copy: the prefill begins here
    copy: tuple[int, int, int] | None = None  # (source slot, first position, end position)


class PrefixIndex:
    """Chained block hash -> the slots holding that prefix, split into in-use and free slots."""

    def __init__(self, num_slots: int):
        self._live: dict[int, set[int]] = {}  # hash -> slots in use (running or prefilling) holding it
        self._free: dict[int, set[int]] = {}  # hash -> free slots still holding it
        self._held: list[list[int]] = [[] for _ in range(num_slots)]  # slot -> hashes of its blocks, in order
        self._tokens: list[list[int]] = [[] for _ in range(num_slots)]  # slot -> the prompt they came from
        self._is_free = [True] * num_slots

    def held(self, slot: int) -> int:
        """Prompt tokens whose K/V slot `slot` holds for lookups (a whole number of blocks)."""
        return len(self._held[slot]) * BLOCK

    def place(self, prompt: list[int], hashes: list[int], free: list[int]) -> Placement:
        """Choose a slot among `free` (not empty) for `prompt`, whose block hashes are `hashes`.

        The free slot holding the longest prefix of it is taken as it is (no copy); a slot in use or free
        that holds more tops it up by a copy. Without a free holder, the lowest free slot gets the copy. At
        least the last prompt token is left to prefill: its logits start the generation."""
        depth = free_depth = 0
        src = dst = -1
        for d, h in enumerate(hashes, 1):
            idle, live = self._free.get(h), self._live.get(h)
            if idle:
                free_depth, dst = d, next(iter(idle))
            if not (idle or live):
                break
            depth, src = d, dst if idle else next(iter(live))
        # The chain is a lookup; the tokens decide (a collision costs a hit, never an output).
        if depth and not self._holds(src, prompt, depth):
            depth = free_depth = 0
        if free_depth and not self._holds(dst, prompt, free_depth):
            free_depth = 0
        if not free_depth:
            dst = min(free)
        limit = len(prompt) - 1
        kept, start = min(free_depth * BLOCK, limit), min(depth * BLOCK, limit)
        return Placement(dst, max(kept, start), (src, kept, start) if start > kept else None)

    def _holds(self, slot: int, prompt: list[int], blocks: int) -> bool:
        n = blocks * BLOCK
        return self._tokens[slot][:n] == prompt[:n]

    def take(self, slot: int, prompt: list[int], keep: int) -> None:
        """`slot` is handed out for `prompt` with its first `keep` tokens valid (blocks below them stay)."""
        self._unindex(slot)
        blocks = keep // BLOCK
        self._held[slot] = self._held[slot][:blocks]
        self._tokens[slot] = prompt
        self._is_free[slot] = False
        self._index(slot)

    def register(self, slot: int, hashes: list[int], end: int) -> None:
        """The K/V of prompt[:end] is now written in `slot` (in use): its full blocks become findable."""
        table = self._live if not self._is_free[slot] else self._free
        for h in hashes[len(self._held[slot]) : end // BLOCK]:
            table.setdefault(h, set()).add(slot)
            self._held[slot].append(h)

    def release(self, slot: int) -> None:
        """`slot`'s sequence ended: it is free, its K/V (and so its entries) intact."""
        self._unindex(slot)
        self._is_free[slot] = True
        self._index(slot)

    def move(self, src: int, dst: int) -> None:
        """Compaction copied `src`'s K/V into free `dst` and freed `src`: both hold the same prefix now."""
        self._unindex(dst)
        self._held[dst], self._tokens[dst] = list(self._held[src]), self._tokens[src]
        self._is_free[dst] = False
        self._index(dst)
        self.release(src)

    def drop(self, slot: int) -> None:
        """Forget what `slot` holds (its K/V may be half written) and count it free."""
        self._unindex(slot)
        self._held[slot], self._tokens[slot] = [], []
        self._is_free[slot] = True

    def _index(self, slot: int) -> None:
        table = self._free if self._is_free[slot] else self._live
        for h in self._held[slot]:
            table.setdefault(h, set()).add(slot)

    def _unindex(self, slot: int) -> None:
        table = self._free if self._is_free[slot] else self._live
        for h in self._held[slot]:
            holders = table.get(h)
            if holders is not None:
                holders.discard(slot)
                if not holders:
                    del table[h]
