"""The model step: turn a scheduled step into tensors, run the GPT2 forward, return logits.

Prefill runs eagerly (its shapes change every step). Decode on CUDA replays a CUDA graph captured per
(batch bucket, span bucket), lazily on first use, so the launch cost of 30 layers is paid once per bucket and
not per token; on CPU it runs eagerly at the exact width and span. The runner makes no scheduling decisions.
"""

from __future__ import annotations

import bisect
import logging

import torch

from .gpt2 import GPT2, Group
from .kv_cache import KVCache
from .scheduler import DecodeStep, PrefillStep

log = logging.getLogger(__name__)

SPAN_BUCKET = 128  # decode attention reads the cache in multiples of this many positions on CUDA
PREFILL_WIDTH_BUCKET = 16  # prefill's padded query length, a multiple of this
EAGER_SPAN_BUCKET = (
    64  # attention run eagerly (prefill; decode on CPU) reads multiples of this many positions
)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucketed_span(span: int, bucket: int, context: int) -> int:
    """Cache positions attention reads: `span` rounded up to a multiple of `bucket`, within the context."""
    return min(context, round_up(span, bucket))


def batch_buckets(max_rows: int) -> list[int]:
    """Decode batch sizes that get a graph: 1, 2, 4, 8, then multiples of 16, up to max_rows."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_rows] + list(range(16, max_rows, 16))
    return [*sizes, max_rows]


def pack_chunks(
    chunks: list[tuple[int, list[int], int]],
    context: int,
    device: torch.device,
    wanted: list[tuple[int, int]] | None = None,
):
    """(slot, tokens, start) chunks -> the packed tensors of `GPT2.prefill` (tokens, seq_idx, t_idx, slots,
    starts, last), its attention groups, and where each chunk's first token sits in the packing (by chunk
    index). `last` holds the packed index of each (chunk, offset) of `wanted` (None: every token), so that
    a step's inputs reach the device in one transfer.

    Chunks are packed shortest first and cut into groups of similar length (see gpt2.Group). Queries and keys
    are rounded up (the extra ones masked, never read back): CPU attention kernels sum in another order for
    odd query counts and ragged spans, so a chunk's K/V and logits would depend on the chunks beside it.
    Rounded, they do not: with gpt2.MIN_ROWS, a row's bits depend only on its tokens, and a prefix copied from
    the cache is the K/V its prompt would compute."""
    order = sorted(range(len(chunks)), key=lambda b: len(chunks[b][1]))
    tokens, seq_idx, t_idx, slots, starts, groups = [], [], [], [], [], []
    offsets = [0] * len(chunks)
    for b, c in enumerate(order):
        slot, toks, start = chunks[c]
        n = len(toks)
        offsets[c] = len(tokens)
        width = round_up(n, PREFILL_WIDTH_BUCKET)
        span = bucketed_span(start + n, EAGER_SPAN_BUCKET, context)
        if groups and width <= 2 * groups[-1].width:  # at most twice the group's shortest: join it
            g = groups[-1]
            groups[-1] = Group(g.lo, b + 1, g.lo_token, len(tokens) + n, width, max(g.span, span))
        else:
            groups.append(Group(b, b + 1, len(tokens), len(tokens) + n, width, span))
        tokens += toks
        seq_idx += [b] * n
        t_idx += range(n)
        slots.append(slot)
        starts.append(start)
    n, B = len(tokens), len(slots)
    last = range(n) if wanted is None else [offsets[c] + i for c, i in wanted]
    packed = torch.tensor([*tokens, *seq_idx, *t_idx, *slots, *starts, *last], dtype=torch.long)
    return packed.to(device, non_blocking=True).split([n, n, n, B, B, len(last)]), groups, offsets


class ModelRunner:
    def __init__(self, model: GPT2, cache: KVCache, cuda_graphs: bool = True):
        self.model = model
        self.cache = cache
        self.device = model.device
        self.graphs_on = cuda_graphs and self.device.type == "cuda"
        self.buckets = batch_buckets(cache.slots)
        self._graphs: dict[tuple[int, int], tuple[object, torch.Tensor]] = {}
        self._pool = None
        # Static inputs of the captured decode graphs (one set shared by all buckets).
        self._ids = torch.zeros(cache.slots, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(cache.slots, dtype=torch.long, device=self.device)

    def _to_device(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    def prefill(self, step: PrefillStep) -> torch.Tensor:
        """Cache the step's prompt chunks; return (G, V) logits at the last prompt token of each chunk that
        completes its prompt, in chunk order."""
        for src, dst, start, end in step.copies:  # cached prefixes into new slots, before anything reads them
            self.cache.copy(src, [dst], start, end)
        chunks = [
            (ch.request.seqs[0].slot, ch.request.prompt[ch.start : ch.end], ch.start) for ch in step.chunks
        ]
        wanted = [(b, ch.end - ch.start - 1) for b, ch in enumerate(step.chunks) if ch.completes]
        packed, groups, _ = pack_chunks(chunks, self.cache.context, self.device, wanted)
        logits = self.model.prefill(self.cache, *packed[:5], groups, packed[5])
        for ch in step.chunks:  # the other samples of a completed prompt get a copy of its K/V
            if ch.completes and ch.request.n > 1:
                seqs = ch.request.seqs
                self.cache.copy(seqs[0].slot, [s.slot for s in seqs[1:]], 0, ch.end)
        return logits

    def decode(self, step: DecodeStep) -> torch.Tensor:
        """(len(step.seqs), V) logits, one row per running sequence in step order."""
        width = step.width
        ids = [0] * width
        # A slot in 0..width-1 without a running sequence writes its scratch K/V at the last position, which
        # no prefill touches and which its own sequence rewrites before reading.
        pos = [self.cache.context - 1] * width
        rows = []
        for s in step.seqs:
            ids[s.slot], pos[s.slot] = s.tokens[-1], s.position
            rows.append(s.slot)
        span = max(s.position for s in step.seqs) + 1  # rounded up below, as in prefill
        packed = self._to_device([*ids, *pos, *rows])
        ids_t, pos_t, rows_t = packed.split([width, width, len(rows)])
        if self.graphs_on:
            logits = self._replay(ids_t, pos_t, width, span)
        else:
            span = bucketed_span(span, EAGER_SPAN_BUCKET, self.cache.context)
            logits = self.model.decode(self.cache, ids_t, pos_t, span)
        return logits if len(rows) == width else logits[rows_t]

    def _replay(self, ids: torch.Tensor, pos: torch.Tensor, width: int, span: int) -> torch.Tensor:
        B = self.buckets[bisect.bisect_left(self.buckets, width)]
        S = bucketed_span(span, SPAN_BUCKET, self.cache.context)
        self._ids[:width].copy_(ids)
        self._pos[:width].copy_(pos)
        self._ids[width:B].zero_()
        self._pos[width:B].fill_(self.cache.context - 1)
        if (B, S) not in self._graphs:
            self._graphs[(B, S)] = self._capture(B, S)
        replay, out = self._graphs[(B, S)]
        replay()
        return out[:width].clone()  # out lives in the graph pool; the next replay overwrites it

    def _capture(self, B: int, S: int):
        """Capture decode at batch B and span S (gpt-fast / nano-vllm's way: warm up on a side stream);
        return (replay function, its output tensor)."""
        ids, pos = self._ids[:B], self._pos[:B]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model.decode(self.cache, ids, pos, S)  # same inputs: rewrites the same K/V values
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.model.decode(self.cache, ids, pos, S)
        self._pool = graph.pool()
        log.debug("captured the decode graph for batch %d, span %d", B, S)
        return graph.replay, out
