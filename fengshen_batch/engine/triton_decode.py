"""Decode attention on CUDA: Triton kernels over the block tables, flash-decoding style, with cascade tiles.

Three launches per layer, all with shapes fixed per batch bucket, so the CUDA graphs capture them with the
block tables, lengths and tiles as static inputs (one graph per batch size, not per span):
- `own`: one program per (row, head, split) streams the row's own blocks, from its `start` (the end of its
  shared prefix, 0 without one) to its length, one block at a time with an online softmax; it reads nothing
  past the row's live positions, so a step reads the live K/V of its rows and no padding;
- `prefix` (cascade attention, FlashInfer's and vLLM's name): rows whose tables begin with the same blocks
  (a few-shot header, the n samples of one prompt) are cut into tiles of up to `TILE_ROWS` rows; one program
  per (tile, head, split) reads the shared blocks once for the whole tile and scores all its queries with one
  matmul (`tl.dot`), instead of every row reading its own copy of the same K/V;
- `merge`: each row's partial results (its tile's prefix splits, then its own splits) are combined by their
  log-sum-exp, as flash-decoding merges its splits.
Partial results are float32; scores are computed in the cache's dtype with float32 accumulation, and the
probabilities are cast to it for the product with V, as FlashAttention does.

The kernels are built on first use (`kernels()`), so that `TRITON_INTERPRET=1`, set by the tests on a machine
without a GPU, takes effect: `tests/test_triton_decode.py` runs them in Triton's interpreter on CPU tensors
against SDPA over the same K/V gathered densely. Planning the tiles is host work on the step's block tables
(`cascade_tiles`), done where the step's other inputs are built.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .kv_cache import BLOCK

try:  # module globals: Triton's interpreter patches `tl` where the kernels find it
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch: the engine decodes with attention.py there
    triton = tl = None

TILE_ROWS = 16  # queries per cascade tile: tl.dot's smallest tile side


def available() -> bool:
    """Triton imports (CUDA builds of torch ship it)."""
    return triton is not None


@functools.cache
def kernels():
    """(own, prefix, merge) Triton kernels, decorated on first call."""

    @triton.jit
    def own(q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, starts_ptr, po_ptr, plse_ptr,
            stride_qb, stride_qh, stride_kh, stride_kb, stride_kt, stride_tb, stride_pb, stride_ph, stride_ps,
            stride_lb, stride_lh, scale, blocks_per_split, first_slot,
            HD: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_T: tl.constexpr):  # fmt: skip
        b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        length = tl.load(lens_ptr + b)
        lo = tl.load(starts_ptr + b) // BLOCK_T + s * blocks_per_split  # first block of this split
        hi = tl.minimum(lo + blocks_per_split, tl.cdiv(length, BLOCK_T))
        d = tl.arange(0, HD_PAD)
        t = tl.arange(0, BLOCK_T)
        dm = d < HD
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d, mask=dm, other=0.0).to(tl.float32)  # (HD_PAD,)
        m = tl.full((), -float("inf"), tl.float32)
        l_sum = tl.zeros((), tl.float32)
        acc = tl.zeros((HD_PAD,), tl.float32)
        base = h * stride_kh + t[:, None] * stride_kt + d[None, :]  # (BLOCK_T, HD_PAD) within a block
        for i in range(lo, hi):
            blk = tl.load(tables_ptr + b * stride_tb + i)
            kv = blk * stride_kb + base
            k = tl.load(k_ptr + kv, mask=dm[None, :], other=0.0).to(tl.float32)
            x = tl.sum(k * q[None, :], 1) * scale  # (BLOCK_T,)
            x = tl.where(i * BLOCK_T + t < length, x, -float("inf"))
            m_new = tl.maximum(m, tl.max(x, 0))
            p = tl.exp(x - m_new)
            alpha = tl.exp(m - m_new)
            v = tl.load(v_ptr + kv, mask=dm[None, :], other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            l_sum = l_sum * alpha + tl.sum(p, 0)
            m = m_new
        empty = l_sum == 0.0  # no block in this split: a partial that weighs nothing in the merge
        slot = first_slot + s
        safe = tl.where(empty, 1.0, l_sum)
        tl.store(po_ptr + b * stride_pb + h * stride_ph + slot * stride_ps + d, acc / safe, mask=dm)
        tl.store(
            plse_ptr + b * stride_lb + h * stride_lh + slot, tl.where(empty, -float("inf"), m + tl.log(safe))
        )

    @triton.jit
    def prefix(q_ptr, k_ptr, v_ptr, tables_ptr, tile_rows_ptr, tile_len_ptr, po_ptr, plse_ptr,
               stride_qb, stride_qh, stride_kh, stride_kb, stride_kt, stride_tb, stride_pb, stride_ph, stride_ps,
               stride_lb, stride_lh, scale, blocks_per_split,
               HD: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_T: tl.constexpr, ROWS: tl.constexpr,
               PRECISION: tl.constexpr):  # fmt: skip
        g, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        r = tl.arange(0, ROWS)
        rows = tl.load(tile_rows_ptr + g * ROWS + r)  # (ROWS,) row ids, -1 where the tile is short
        live = rows >= 0
        rows = tl.where(live, rows, 0)
        first = tl.load(tile_rows_ptr + g * ROWS)  # the tile's first row: its table holds the shared blocks
        shared = tl.load(tile_len_ptr + g) // BLOCK_T  # shared blocks (0: an unused tile)
        lo = s * blocks_per_split
        hi = tl.minimum(lo + blocks_per_split, shared)
        d = tl.arange(0, HD_PAD)
        t = tl.arange(0, BLOCK_T)
        dm = d < HD
        q = tl.load(
            q_ptr + rows[:, None] * stride_qb + h * stride_qh + d[None, :],
            mask=live[:, None] & dm[None, :],
            other=0.0,
        )  # (ROWS, HD_PAD)
        m = tl.full((ROWS,), -float("inf"), tl.float32)
        l_sum = tl.zeros((ROWS,), tl.float32)
        acc = tl.zeros((ROWS, HD_PAD), tl.float32)
        base = h * stride_kh + t[:, None] * stride_kt + d[None, :]
        for i in range(lo, hi):
            blk = tl.load(tables_ptr + tl.maximum(first, 0) * stride_tb + i)
            kv = blk * stride_kb + base
            k = tl.load(k_ptr + kv, mask=dm[None, :], other=0.0)  # (BLOCK_T, HD_PAD), read once per tile
            # (ROWS, BLOCK_T): every position of a shared block is live
            x = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            m_new = tl.maximum(m, tl.max(x, 1))
            p = tl.exp(x - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(v_ptr + kv, mask=dm[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l_sum = l_sum * alpha + tl.sum(p, 1)
            m = m_new
        empty = l_sum == 0.0
        safe = tl.where(empty, 1.0, l_sum)
        slot = rows * stride_pb + h * stride_ph + s * stride_ps  # (ROWS,)
        tl.store(po_ptr + slot[:, None] + d[None, :], acc / safe[:, None], mask=live[:, None] & dm[None, :])
        lse = tl.where(empty, -float("inf"), m + tl.log(safe))
        tl.store(plse_ptr + rows * stride_lb + h * stride_lh + s, lse, mask=live)

    @triton.jit
    def merge(po_ptr, plse_ptr, starts_ptr, out_ptr, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
              stride_ob, stride_oh, prefix_slots, SLOTS: tl.constexpr, SLOTS_PAD: tl.constexpr, HD: tl.constexpr,
              HD_PAD: tl.constexpr):  # fmt: skip
        b, h = tl.program_id(0), tl.program_id(1)
        sl = tl.arange(0, SLOTS_PAD)
        d = tl.arange(0, HD_PAD)
        # a row with no shared prefix (start 0) has no prefix partials: its prefix slots hold stale values
        first = tl.where(tl.load(starts_ptr + b) > 0, 0, prefix_slots)
        use = (sl >= first) & (sl < SLOTS)
        lse = tl.load(plse_ptr + b * stride_lb + h * stride_lh + sl, mask=use, other=-float("inf"))
        top = tl.max(lse, 0)
        w = tl.where(use, tl.exp(lse - top), 0.0)  # (SLOTS_PAD,)
        po = tl.load(po_ptr + b * stride_pb + h * stride_ph + sl[:, None] * stride_ps + d[None, :],
                     mask=use[:, None] & (d[None, :] < HD), other=0.0)  # fmt: skip
        o = tl.sum(po * w[:, None], 0) / tl.sum(w, 0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < HD)

    return own, prefix, merge


@dataclass(frozen=True)
class Splits:
    """How a batch bucket's attention is cut: `own` splits of `own_blocks` blocks per row and head, `prefix`
    splits of `prefix_blocks` blocks per tile and head, `tiles` cascade tiles at most. Fixed per bucket, so
    the captured graph's launches keep their grids."""

    own: int
    own_blocks: int
    prefix: int
    prefix_blocks: int
    tiles: int


def plan_splits(rows: int, heads: int, max_blocks: int, sms: int) -> Splits:
    """Enough programs to fill the device (about 4 per SM) at small batches, one split per row at large ones:
    a split streams at least 8 blocks, so a short row's work is not cut into launches of nothing."""
    own = max(1, min(math.ceil(4 * sms / (rows * heads)), math.ceil(max_blocks / 8)))
    tiles = math.ceil(rows / TILE_ROWS) + 8  # rows / TILE_ROWS full tiles, a few short ones
    prefix = max(1, min(math.ceil(4 * sms / (tiles * heads)), math.ceil(max_blocks / 8)))
    return Splits(own, math.ceil(max_blocks / own), prefix, math.ceil(max_blocks / prefix), tiles)


def cascade_tiles(tables: list[list[int]], lens: list[int], max_tiles: int, min_rows: int = 2):
    """Rows whose block tables begin with the same blocks -> (tile rows (T, TILE_ROWS) with -1 padding,
    tile shared lengths (T,) in positions, each row's start (B,)): the shared part of a tile is its rows'
    common whole blocks, short of the block each row writes this step. Groups of fewer than `min_rows` rows,
    and tiles past `max_tiles` (largest groups first), are left to the rows' own attention (start 0)."""
    B = len(tables)
    starts = [0] * B
    by_first: dict[int, list[int]] = {}
    for r, table in enumerate(tables):
        if lens[r] > BLOCK:  # at least one whole block before the one being written
            by_first.setdefault(table[0], []).append(r)
    tiles: list[tuple[list[int], int]] = []
    for rows in sorted(by_first.values(), key=len, reverse=True):
        if len(rows) < min_rows:
            continue
        common = min((lens[r] - 1) // BLOCK for r in rows)  # whole blocks before each row's current one
        t0 = tables[rows[0]]
        for r in rows[1:]:
            t, n = tables[r], 0
            while n < common and t[n] == t0[n]:
                n += 1
            common = n
        for i in range(0, len(rows), TILE_ROWS):
            if len(tiles) == max_tiles:
                break
            tile = rows[i : i + TILE_ROWS]
            if len(tile) < min_rows:
                continue
            tiles.append((tile, common * BLOCK))
            for r in tile:
                starts[r] = common * BLOCK
    tile_rows = [t + [-1] * (TILE_ROWS - len(t)) for t, _ in tiles]
    tile_rows += [[-1] * TILE_ROWS] * (max_tiles - len(tiles))
    tile_len = [n for _, n in tiles] + [0] * (max_tiles - len(tiles))
    return tile_rows, tile_len, starts


class TritonDecode:
    """Decode attention of one batch bucket through the three kernels, with its partial-result workspace.

    `__call__` launches only (no host sync, no allocation): the CUDA graph of the bucket captures it."""

    def __init__(self, rows: int, heads: int, head_dim: int, max_blocks: int, device, sms: int | None = None):
        if sms is None:
            sms = (
                torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
            )
        self.splits = plan_splits(rows, heads, max_blocks, sms)
        self.slots = self.splits.prefix + self.splits.own
        self.hd_pad = triton_pow2(head_dim)
        # each (row, head)'s partial outputs and their log-sum-exps: prefix splits first, then its own
        self.po = torch.zeros(rows, heads, self.slots, self.hd_pad, dtype=torch.float32, device=device)
        self.plse = torch.zeros(rows, heads, self.slots, dtype=torch.float32, device=device)

    def __call__(self, q, k_cache, v_cache, tables, lens, starts, tile_rows, tile_len, scale):
        """q (B, H, hd); k/v_cache (H, blocks, BLOCK, hd) of one layer; tables (B, nb); lens, starts (B,);
        tile_rows (T, TILE_ROWS), tile_len (T,) from `cascade_tiles`. Returns (B, H, hd) in q's dtype."""
        own, prefix, merge = kernels()
        B, H, hd = q.shape
        sp = self.splits
        po, plse = self.po[:B], self.plse[:B]
        out = torch.empty_like(q)
        ks = k_cache.stride()
        strides = (q.stride(0), q.stride(1), ks[0], ks[1], ks[2], tables.stride(0),
                   po.stride(0), po.stride(1), po.stride(2), plse.stride(0), plse.stride(1))  # fmt: skip
        if tile_rows.shape[0]:
            prefix[(tile_rows.shape[0], H, sp.prefix)](
                q, k_cache, v_cache, tables, tile_rows, tile_len, po, plse, *strides, scale, sp.prefix_blocks,
                HD=hd, HD_PAD=self.hd_pad, BLOCK_T=BLOCK, ROWS=TILE_ROWS,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # no TF32 rounding of float32 scores
            )  # fmt: skip
        own[(B, H, sp.own)](
            q, k_cache, v_cache, tables, lens, starts, po, plse, *strides, scale, sp.own_blocks, sp.prefix,
            HD=hd, HD_PAD=self.hd_pad, BLOCK_T=BLOCK,
        )  # fmt: skip
        merge[(B, H)](
            po, plse, starts, out, *strides[6:], out.stride(0), out.stride(1), sp.prefix, SLOTS=self.slots, SLOTS_PAD=triton_pow2(self.slots), HD=hd, HD_PAD=self.hd_pad,
        )  # fmt: skip
        return out


def triton_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
