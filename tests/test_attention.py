"""The paged decode attention kernel against plain SDPA over the same K/V, and its batch invariance.

The reference gathers each row's blocks into a dense (B, H, S, hd) tensor and calls
`F.scaled_dot_product_attention` with a length mask: an independent computation of the same attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fengshen_batch.engine.attention import MIN_DECODE_ROWS, DecodeKernel, pad_rows, paged_decode
from fengshen_batch.engine.kv_cache import BLOCK, KVCache

H, HD, BLOCKS = 4, 16, 64
SCALE = HD**-0.5


def _cache(seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(H, BLOCKS, BLOCK, HD, generator=g)
    v = torch.randn(H, BLOCKS, BLOCK, HD, generator=g)
    k[:, 0] = 0  # the null block
    v[:, 0] = 0
    return k, v


def _reference(q, k, v, tables, lens):
    """SDPA over each row's blocks copied out densely, positions >= len masked (scale 1/sqrt(head size))."""
    (B, nb), (heads, _, _, hd) = tables.shape, k.shape
    keys = k[:, tables].reshape(heads, B, nb * BLOCK, hd).transpose(0, 1)  # (B, H, S, hd)
    vals = v[:, tables].reshape(heads, B, nb * BLOCK, hd).transpose(0, 1)
    mask = (torch.arange(nb * BLOCK) < lens[:, None])[:, None, None]  # (B, 1, 1, S)
    return F.scaled_dot_product_attention(q[:, :, None], keys, vals, attn_mask=mask, scale=hd**-0.5)[:, :, 0]


def _tables(rows, lens, shared_blocks=0, seed=1):
    """Block tables for rows of `lens` positions: distinct random blocks, the first `shared_blocks` the same
    blocks for every row (a shared prefix), padded with the null block to the longest."""
    g = torch.Generator().manual_seed(seed)
    nb = max(-(-n // BLOCK) for n in lens)
    perm = torch.randperm(BLOCKS - 1 - shared_blocks, generator=g) + 1 + shared_blocks
    tables = torch.zeros(rows, nb, dtype=torch.long)
    used = 0
    for r, n in enumerate(lens):
        own = -(-n // BLOCK)
        tables[r, :shared_blocks] = torch.arange(1, shared_blocks + 1)
        k = max(0, own - shared_blocks)
        tables[r, shared_blocks:own] = perm[used : used + k]
        used += k
    return tables


def test_the_kernel_equals_sdpa_at_ragged_lengths_block_edges_and_shared_prefixes():
    k, v = _cache()
    kernel = DecodeKernel()
    lens_cases = [
        [1, 15, 16, 17, 31, 32, 33, 70],  # block boundaries, one position
        [48, 49, 50, 64],  # a shared prefix of 3 blocks, then each row's own
    ]
    for lens, shared in zip(lens_cases, (0, 3), strict=True):
        tables = _tables(len(lens), lens, shared)
        q = torch.randn(len(lens), H, HD, generator=torch.Generator().manual_seed(2))
        lens_t = torch.tensor(lens)
        want = _reference(q, k, v, tables, lens_t)
        for fn in (paged_decode, kernel):  # eager and compiled
            got = fn(q, k, v, tables, lens_t, SCALE)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_rows_bits_do_not_depend_on_the_rows_beside_it_or_where_its_blocks_lie():
    """The same row alone (padded to MIN_DECODE_ROWS), beside longer rows (more null-block padding), and with
    its K/V copied into other blocks (caching on vs off): equal bits."""
    k, v = _cache()
    kernel = DecodeKernel()
    q0 = torch.randn(1, H, HD, generator=torch.Generator().manual_seed(3))
    table0 = torch.tensor([[5, 9, 2, 30]])  # 60 positions in 4 blocks
    len0 = torch.tensor([60])
    tables, lens = pad_rows(table0, len0, MIN_DECODE_ROWS)
    alone = kernel(torch.cat([q0, torch.zeros(MIN_DECODE_ROWS - 1, H, HD)]), k, v, tables, lens, SCALE)[0]

    others = _tables(7, [100, 20, 77, 130, 3, 64, 45], seed=4)  # may read row 0's blocks too: reads only
    wide = torch.zeros(8, others.shape[1], dtype=torch.long)
    wide[0, :4] = table0[0]
    wide[1:] = others
    q = torch.cat([q0, torch.randn(7, H, HD, generator=torch.Generator().manual_seed(5))])
    beside = kernel(q, k, v, wide, torch.tensor([60, 100, 20, 77, 130, 3, 64, 45]), SCALE)[0]
    assert torch.equal(alone, beside)

    k2, v2 = k.clone(), v.clone()
    moved = torch.tensor([[50, 51, 52, 53]])
    k2[:, moved[0]] = k[:, table0[0]]
    v2[:, moved[0]] = v[:, table0[0]]
    tables, lens = pad_rows(moved, len0, MIN_DECODE_ROWS)
    elsewhere = kernel(torch.cat([q0, torch.zeros(MIN_DECODE_ROWS - 1, H, HD)]), k2, v2, tables, lens, SCALE)[
        0
    ]
    assert torch.equal(alone, elsewhere)


def test_writes_land_where_the_table_says():
    cache = KVCache(
        n_layer=2, blocks=8, n_head=H, head_dim=HD, dtype=torch.float32, device=torch.device("cpu")
    )
    blocks, offsets = torch.tensor([3, 3, 6]), torch.tensor([0, 15, 7])
    k = torch.randn(3, H, HD)
    cache.write(1, blocks, offsets, k, -k)
    for i in range(3):
        assert torch.equal(cache.k[1][:, blocks[i], offsets[i]], k[i])
        assert torch.equal(cache.v[1][:, blocks[i], offsets[i]], -k[i])
    assert cache.k[0].abs().sum() == 0  # another layer untouched
    assert cache.k[1].abs().sum() == k.abs().sum()  # nothing else written


def test_batches_of_any_shape_reuse_the_one_compiled_kernel():
    """Row counts equal to the head count, one block, tables sliced out of wider ones: none of them compiles
    again (each compile costs seconds in the middle of a job)."""
    from torch._dynamo.utils import counters

    k, v = _cache()
    kernel = DecodeKernel()
    q = torch.randn(8, H, HD)
    wide = _tables(8, [40, 70, 16, 5, 33, 64, 1, 20], seed=6)
    kernel(q, k, v, wide, torch.tensor([40, 70, 16, 5, 33, 64, 1, 20]), SCALE)
    compiled = counters["stats"]["unique_graphs"]
    for rows, nb in [(H, H), (2, 1), (3, H), (5, 2)]:
        tables = wide[:rows, :nb]  # not contiguous
        lens = torch.full((rows,), nb * BLOCK)
        got = kernel(q[:rows], k, v, tables, lens, SCALE)
        torch.testing.assert_close(got, _reference(q[:rows], k, v, tables, lens), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == compiled
