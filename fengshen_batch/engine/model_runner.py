"""The model step: turn a scheduled step into tensors, run the GPT2 forward, return logits.

Prefill runs eagerly (its shapes change every step). Decode on CUDA replays a CUDA graph captured per batch
bucket, lazily on first use, with the block tables, positions, cascade tiles and row starts as static inputs,
so the launch cost of 30 layers is paid once per bucket and not per token; its Triton attention reads each
row's live blocks only (without Triton: a graph per (batch, span) bucket over gathered K/V). On CPU decode
runs eagerly with its rows sorted by length and cut into groups of similar span, so attention reads little
more than each row's live K/V. The runner makes no scheduling decisions (the tiles are read off the tables).
"""

from __future__ import annotations

import bisect
import logging

import torch

from . import triton_decode
from .gpt2 import GPT2, Group
from .kv_cache import BLOCK, NULL_BLOCK, KVCache
from .scheduler import DecodeStep, PrefillStep
from .triton_decode import TILE_ROWS, TritonDecode, cascade_tiles

log = logging.getLogger(__name__)

SPAN_BUCKET = 128  # decode attention reads the cache in multiples of this many positions on CUDA
PREFILL_WIDTH_BUCKET = 16  # prefill's padded query length, a multiple of this
EAGER_SPAN_BUCKET = 64  # prefill's attention (run eagerly) reads multiples of this many positions


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucketed_span(span: int, bucket: int, context: int) -> int:
    """Cache positions attention reads: `span` rounded up to a multiple of `bucket`, within the context."""
    return min(context, round_up(span, bucket))


def block_span(span: int, bucket: int, context: int) -> int:
    """`bucketed_span` in whole KV blocks (a paged read takes whole blocks; positions past the context are
    masked)."""
    return round_up(bucketed_span(span, bucket, context), BLOCK)


# CPU decode: a group of rows (sorted by length) is cut where its span would exceed its first row's by this
# factor, so that attention reads at most about this much more than the rows' live K/V.
DECODE_GROUP_SLACK = 1.2


def batch_buckets(max_rows: int) -> list[int]:
    """Decode batch sizes that get a graph: 1, 2, 4, 8, then multiples of 16, up to max_rows."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_rows] + list(range(16, max_rows, 16))
    return [*sizes, max_rows]


def pack_chunks(
    chunks: list[tuple[list[int], list[int], int]],
    context: int,
    device: torch.device,
    wanted: list[tuple[int, int]] | None = None,
):
    """(block table, tokens, start) chunks -> the packed tensors of `GPT2.prefill` (tokens, seq_idx, t_idx,
    tables, starts, last), its attention groups, and where each chunk's first token sits in the packing (by chunk
    index). `last` holds the packed index of each (chunk, offset) of `wanted` (None: every token), so that
    a step's inputs reach the device in one transfer.

    Chunks are packed shortest first and cut into groups of similar length (see gpt2.Group). Queries and keys
    are rounded up (the extra ones masked, never read back): CPU attention kernels sum in another order for
    odd query counts and ragged spans, so a chunk's K/V and logits would depend on the chunks beside it.
    Rounded, they do not: with gpt2.MIN_ROWS, a row's bits depend only on its tokens, and a prefix copied from
    the cache is the K/V its prompt would compute."""
    order = sorted(range(len(chunks)), key=lambda b: len(chunks[b][1]))
    tokens, seq_idx, t_idx, tables, starts, groups = [], [], [], [], [], []
    offsets = [0] * len(chunks)
    for b, c in enumerate(order):
        table, toks, start = chunks[c]
        n = len(toks)
        offsets[c] = len(tokens)
        width = round_up(n, PREFILL_WIDTH_BUCKET)
        span = block_span(start + n, EAGER_SPAN_BUCKET, context)
        if groups and width <= 2 * groups[-1].width:  # at most twice the group's shortest: join it
            g = groups[-1]
            groups[-1] = Group(g.lo, b + 1, g.lo_token, len(tokens) + n, width, max(g.span, span))
        else:
            groups.append(Group(b, b + 1, len(tokens), len(tokens) + n, width, span))
        tokens += toks
        seq_idx += [b] * n
        t_idx += range(n)
        tables.append(table)
        starts.append(start)
    n, B = len(tokens), len(tables)
    nb = max(g.span for g in groups) // BLOCK
    flat = [b for table in tables for b in (table[:nb] + [NULL_BLOCK] * (nb - len(table)))]
    last = range(n) if wanted is None else [offsets[c] + i for c, i in wanted]
    packed = torch.tensor([*tokens, *seq_idx, *t_idx, *flat, *starts, *last], dtype=torch.long)
    out = list(packed.to(device, non_blocking=True).split([n, n, n, B * nb, B, len(last)]))
    out[3] = out[3].view(B, nb)
    return out, groups, offsets


def decode_groups(spans: list[int], slack: float = DECODE_GROUP_SLACK) -> list[tuple[int, int, int]]:
    """Rows sorted by span -> (first row, end row, span) groups: a group grows while its last (longest) row's
    span stays within `slack` of its first row's."""
    groups: list[tuple[int, int, int]] = []
    for r, s in enumerate(spans):
        if groups and s <= slack * spans[groups[-1][0]]:
            lo, _, _ = groups[-1]
            groups[-1] = (lo, r + 1, s)
        else:
            groups.append((r, r + 1, s))
    return groups


class ModelRunner:
    def __init__(self, model: GPT2, cache: KVCache, max_seqs: int, cuda_graphs: bool = True):
        self.model = model
        self.cache = cache
        self.device = model.device
        self.context = model.max_len
        self.max_blocks = -(-self.context // BLOCK)
        self.graphs_on = cuda_graphs and self.device.type == "cuda"
        self.bucketed = self.device.type == "cuda"  # decode at bucketed batch sizes (the graphs' shapes)
        self.buckets = batch_buckets(max_seqs)
        self._graphs: dict[tuple[int, int], tuple[object, torch.Tensor]] = {}
        self._pool = None
        # Static inputs of the captured decode graphs (one set shared by all buckets).
        self._ids = torch.zeros(max_seqs, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(max_seqs, dtype=torch.long, device=self.device)
        self._tables = torch.zeros(max_seqs, self.max_blocks, dtype=torch.long, device=self.device)
        # Triton decode (CUDA): each row's start past its cascade tile's shared prefix, and per batch bucket
        # its attention workspace and tiles (rows, shared lengths)
        self.triton = self.device.type == "cuda" and triton_decode.available()
        self._triton_ok = False  # set once the kernels ran
        self._starts = torch.zeros(max_seqs, dtype=torch.long, device=self.device)
        self._kernels: dict[int, TritonDecode] = {}
        self._tile_rows: dict[int, torch.Tensor] = {}
        self._tile_len: dict[int, torch.Tensor] = {}
        # the last decode's K/V positions read (rows x span, padding rows included) and live (each row's own)
        self.last_kv = (0, 0)

    def _to_device(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    def prefill(self, step: PrefillStep) -> torch.Tensor:
        """Cache the step's prompt chunks; return (G, V) logits at the last prompt token of each chunk that
        completes its prompt, in chunk order. (The prompt's other samples hold the same blocks.)"""
        chunks = [
            (ch.request.seqs[0].table, ch.request.prompt[ch.start : ch.end], ch.start) for ch in step.chunks
        ]
        wanted = [(b, ch.end - ch.start - 1) for b, ch in enumerate(step.chunks) if ch.completes]
        packed, groups, _ = pack_chunks(chunks, self.context, self.device, wanted)
        return self.model.prefill(self.cache, *packed[:5], groups, packed[5])

    def decode(self, step: DecodeStep) -> torch.Tensor:
        """(len(step.seqs), V) logits, one row per running sequence in step order."""
        self.cache.copy_blocks([s for s, _ in step.copies], [d for _, d in step.copies])  # copies on write
        seqs = step.seqs
        if self.bucketed:
            return self._bucketed(seqs)
        # Rows by length, in groups of similar span: each group reads its own span, not the batch's longest.
        order = sorted(range(len(seqs)), key=lambda r: seqs[r].position)
        # whole blocks: the CPU kernel takes any block count (dynamic shapes), so a row reads < BLOCK past its end
        spans = [block_span(seqs[r].position + 1, BLOCK, self.context) for r in order]
        groups = decode_groups(spans)
        self.last_kv = (sum((hi - lo) * span for lo, hi, span in groups), sum(s.position + 1 for s in seqs))
        nb = spans[-1] // BLOCK
        flat = []
        for r in order:
            table = seqs[r].table[:nb]
            flat += table + [NULL_BLOCK] * (nb - len(table))
        B = len(seqs)
        ids = [seqs[r].tokens[-1] for r in order]
        pos = [seqs[r].position for r in order]
        packed = self._to_device([*ids, *pos, *order, *flat])
        ids_t, pos_t, order_t, tables = packed.split([B, B, B, B * nb])
        logits = self.model.decode(self.cache, ids_t, pos_t, tables.view(B, nb), groups)  # rows in `order`
        out = torch.empty_like(logits)
        out[order_t] = logits
        return out

    def _bucketed(self, seqs) -> torch.Tensor:
        """`_replay`, falling back to SDPA for good if the Triton kernels fail on their first use (a build
        whose Triton cannot compile for this device): logged, never silent. Out of memory is the engine's."""
        if not self.triton or self._triton_ok:
            return self._replay(seqs)
        try:
            out = self._replay(seqs)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - a compiler error of any kind
            log.warning("Triton decode attention failed, decoding with gathered K/V and SDPA: %s",
                        str(e).splitlines()[0] if str(e) else type(e).__name__)  # fmt: skip
            self.triton = False
            self._graphs.clear()
            return self._replay(seqs)
        self._triton_ok = True
        return out

    def _replay(self, seqs) -> torch.Tensor:
        """Decode on CUDA: the batch padded to its bucket, through the bucket's CUDA graph (or eagerly, graphs
        off). With Triton (`triton_decode.py`) one graph per batch bucket reads each row's live blocks only, a
        shared prefix once per cascade tile; without it, a graph per (batch, span) bucket gathers every row's
        blocks up to the span and calls SDPA."""
        width = len(seqs)
        B = self.buckets[bisect.bisect_left(self.buckets, width)]
        lens = [s.position + 1 for s in seqs]
        nb = -(-max(lens) // BLOCK)  # table columns any row reads (past them the static tables are stale)
        if self.triton:
            S = self.max_blocks * BLOCK
            attn = self._attention(B)
            tile_rows, tile_len, starts = cascade_tiles([s.table for s in seqs], lens, attn.splits.tiles)
            self.last_kv = (
                sum(tile_len) + sum(n - st for n, st in zip(lens, starts, strict=True)),
                sum(lens),
            )
            extra = [*starts, *(r for t in tile_rows for r in t), *tile_len]
        else:
            S = block_span(max(lens), SPAN_BUCKET, self.context)
            nb = S // BLOCK
            self.last_kv = (B * S, sum(lens))
            extra = []
        flat = []
        for s in seqs:
            table = s.table[:nb]
            flat += table + [NULL_BLOCK] * (nb - len(table))
        packed = self._to_device([*(s.tokens[-1] for s in seqs), *(s.position for s in seqs), *flat, *extra])
        ids, pos, tables, extra_t = packed.split([width, width, width * nb, len(extra)])
        self._ids[:width].copy_(ids)
        self._pos[:width].copy_(pos)
        self._tables[:width, :nb].copy_(tables.view(width, nb))
        # padding rows feed position 0 of the null block: written, never read (masked everywhere)
        self._ids[width:B].zero_()
        self._pos[width:B].zero_()
        self._tables[width:B, :nb].fill_(NULL_BLOCK)
        if self.triton:
            tiles = attn.splits.tiles
            st, rows, tlen = extra_t.split([width, tiles * TILE_ROWS, tiles])
            self._starts[:width].copy_(st)
            self._starts[width:B].zero_()
            self._tile_rows[B].copy_(rows.view(tiles, TILE_ROWS))
            self._tile_len[B].copy_(tlen)
        if not self.graphs_on:
            return self.model.decode(self.cache, *self._inputs(B, S))[:width]
        if (B, S) not in self._graphs:
            self._graphs[(B, S)] = self._capture(B, S)
        replay, out = self._graphs[(B, S)]
        replay()
        return out[:width].clone()  # out lives in the graph pool; the next replay overwrites it

    def _attention(self, B: int) -> TritonDecode:
        """Bucket B's Triton attention (its partial-result workspace) and static tile inputs, made once."""
        if B not in self._kernels:
            m = self.model
            self._kernels[B] = TritonDecode(B, m.n_head, m.head_dim, self.max_blocks, self.device)
            tiles = self._kernels[B].splits.tiles
            self._tile_rows[B] = torch.full((tiles, TILE_ROWS), -1, dtype=torch.long, device=self.device)
            self._tile_len[B] = torch.zeros(tiles, dtype=torch.long, device=self.device)
        return self._kernels[B]

    def _inputs(self, B: int, S: int) -> tuple:
        """`GPT2.decode`'s arguments for bucket (B, S), views of the static buffers."""
        ids, pos, tables = self._ids[:B], self._pos[:B], self._tables[:B, : S // BLOCK]
        paged = None
        if self.triton:
            paged = (self._attention(B), self._starts[:B], self._tile_rows[B], self._tile_len[B])
        return ids, pos, tables, [(0, B, S)], paged

    def _capture(self, B: int, S: int):
        """Capture decode at batch B and span S (gpt-fast / nano-vllm's way: warm up on a side stream, which
        also compiles the Triton kernels); return (replay function, its output tensor)."""
        inputs = self._inputs(B, S)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model.decode(self.cache, *inputs)  # same inputs: rewrites the same K/V
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self.model.decode(self.cache, *inputs)
        self._pool = graph.pool()
        log.debug("captured the decode graph for batch %d, span %d", B, S)
        return graph.replay, out
