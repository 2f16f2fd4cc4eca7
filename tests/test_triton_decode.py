"""The CUDA decode kernels (Triton), run by Triton's interpreter on CPU tensors, against SDPA over the same K/V.

The reference (`test_attention._reference`) copies each row's blocks out densely and masks positions past its
length: an independent computation. The kernels are checked at ragged lengths and block edges, with several
splits per row, with cascade tiles over shared prefixes (a header shared by many rows, the n samples of one
prompt, tiles cut at TILE_ROWS), with a head size that is not a power of two, and with rows that a tile leaves
out. (On a GPU they run compiled; benchmarks/bench.py measures them there.)"""

from __future__ import annotations

import pytest
import torch

from fengshen_batch.engine.kv_cache import BLOCK
from fengshen_batch.engine.triton_decode import TILE_ROWS, TritonDecode, cascade_tiles
from tests.test_attention import _reference, _tables

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def interpreted():
    """The kernels run interpreted here (conftest sets TRITON_INTERPRET before triton is imported)."""
    import triton

    if not triton.knobs.runtime.interpret:
        pytest.skip("TRITON_INTERPRET was not set before triton was imported")


def _cache(H, HD, blocks=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(H, blocks, BLOCK, HD, generator=g)
    v = torch.randn(H, blocks, BLOCK, HD, generator=g)
    k[:, 0] = v[:, 0] = 0  # the null block
    return k, v


def _run(q, k, v, tables, lens, sms=4):
    """The three kernels on one batch, its tiles planned from its tables: (output, each row's start)."""
    hd = q.shape[2]
    att = TritonDecode(q.shape[0], q.shape[1], hd, tables.shape[1], torch.device("cpu"), sms=sms)
    tile_rows, tile_len, starts = cascade_tiles(tables.tolist(), lens.tolist(), att.splits.tiles)
    t = torch.tensor
    out = att(q, k, v, tables, lens, t(starts), t(tile_rows, dtype=torch.long).view(-1, TILE_ROWS),
              t(tile_len), hd**-0.5)  # fmt: skip
    return out, starts


H, HD = 4, 16


def _check(q, k, v, tables, lens, **kw):
    got, starts = _run(q, k, v, tables, lens, **kw)
    torch.testing.assert_close(got, _reference(q, k, v, tables, lens), rtol=2e-5, atol=2e-5)
    return starts


def test_own_blocks_only_at_ragged_lengths_block_edges_and_several_splits():
    k, v = _cache(H, HD)
    lens = [1, 15, 16, 17, 31, 32, 33, 70, 200, 129]
    tables = _tables(len(lens), lens, seed=1)
    q = torch.randn(len(lens), H, HD, generator=torch.Generator().manual_seed(2))
    for sms in (1, 64):  # one split per row; a split every 8 blocks
        starts = _check(q, k, v, tables, torch.tensor(lens), sms=sms)
        assert starts == [0] * len(lens)  # no two rows share a first block


def test_cascade_tiles_over_a_shared_header_and_n_samples():
    """20 rows share a 5-block header (tiles of 16 and 4), 3 samples of one prompt share 3 more blocks after
    it, 2 rows share nothing: each row's result equals the reference, whatever tile it is in."""
    k, v = _cache(H, HD, blocks=160)
    lens = [5 * BLOCK + n for n in (1, 3, 9, 16, 17, 20, 30, 33, 40, 47, 2, 5, 8, 11, 14, 19, 23, 29, 37, 44)]
    tables = torch.nn.functional.pad(_tables(len(lens), lens, shared_blocks=5, seed=3), (0, 2))  # 10 blocks
    samples = tables[:3].clone()  # three samples: the header, 3 blocks of their prompt, then their own
    samples[:, 5:8] = torch.tensor([140, 141, 142])
    lens += [8 * BLOCK + 3, 8 * BLOCK + 9, 8 * BLOCK + 16]
    samples[:, 8] = torch.tensor([150, 151, 152])
    loners = torch.zeros(2, tables.shape[1], dtype=torch.long)
    loners[0, :2], loners[1, :4] = torch.tensor([153, 154]), torch.tensor([155, 156, 157, 158])
    lens += [2 * BLOCK, 3 * BLOCK + 7]
    tables = torch.cat([tables, samples, loners])
    q = torch.randn(len(lens), H, HD, generator=torch.Generator().manual_seed(4))
    for sms in (1, 64):
        starts = _check(q, k, v, tables, torch.tensor(lens), sms=sms)
        # the header rows and the samples start after their shared blocks; the samples' own group (same
        # first block as the header) shares only the header; the loners read everything themselves
        assert starts[:23] == [5 * BLOCK] * 23 and starts[23:] == [0, 0]


def test_a_head_size_that_is_not_a_power_of_two():
    hd = 24  # GPT2-3.5B's heads are 96 wide: padded to 128 inside the kernels, the padding masked
    k, v = _cache(3, hd, blocks=64)
    lens = [40, 41, 60, 7, 100]
    tables = _tables(len(lens), lens, shared_blocks=2, seed=5)
    q = torch.randn(len(lens), 3, hd, generator=torch.Generator().manual_seed(6))
    _check(q, k, v, tables, torch.tensor(lens), sms=64)


def test_tiles_are_planned_from_the_tables():
    BL = BLOCK
    tables = [[1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 8, 0], [5, 6, 0, 0], [7, 0, 0, 0], [1, 2, 3, 4]]
    lens = [4 * BL, 3 * BL + 2, 2 * BL + 5, 2 * BL, BL, 3 * BL]
    tile_rows, tile_len, starts = cascade_tiles(tables, lens, max_tiles=2)
    # rows 0, 1, 2, 5 begin with blocks 1, 2; their common whole blocks before each one's current block: 2
    assert tile_rows[0][:5] == [0, 1, 2, 5, -1] and tile_len == [2 * BL, 0]
    assert starts == [2 * BL, 2 * BL, 2 * BL, 0, 0, 2 * BL]
    assert tile_rows[1] == [-1] * TILE_ROWS  # an unused tile: its programs read nothing
    # a row alone in its group, or a limit of no tiles: nothing shared
    assert cascade_tiles(tables, lens, max_tiles=0)[2] == [0] * 6
    many = [[1, 2, 3]] * (TILE_ROWS + 1)
    rows, lens_t, st = cascade_tiles(many, [3 * BL] * (TILE_ROWS + 1), max_tiles=4)
    assert lens_t == [2 * BL, 0, 0, 0] and st[-1] == 0  # the 17th row would be a tile of one: left out


def test_the_engine_decodes_through_the_kernels_as_it_does_on_cpu(replica):
    """The engine's CUDA decode path (bucketed batches, static buffers, cascade tiles planned from the block
    tables), run eagerly with the kernels interpreted: few-shot prompts sharing a two-block header and three
    samples per prompt give the CPU path's tokens, logprobs within float rounding, and read the header once
    per tile (K/V read below the live K/V)."""
    from fengshen_batch.engine.llm_engine import LLMEngine
    from fengshen_batch.kinds.generation import generate_tokens
    from fengshen_batch.params import EngineParams, GenerateParams
    from tests.test_prefix_cache import _few_shot

    prompts, limits = _few_shot(replica)
    prompts, limits = prompts[:3], [min(n, 4) for n in limits[:3]]
    params = GenerateParams(max_new_tokens=4, seed=3, temperature=0.8, num_return_sequences=3)
    runs = {}
    for name in ("cpu", "triton"):
        engine = LLMEngine(replica, params, EngineParams(max_num_seqs=16))
        if name == "triton":
            engine.runner.triton = engine.runner.bucketed = True
        ids = [f"r{i}" for i in range(len(prompts))]
        runs[name] = (generate_tokens(replica, prompts, ids, params, limits, engine=engine), engine.stats)
    (cpu, _), (tri, stats) = runs["cpu"], runs["triton"]
    for a, b in zip(cpu, tri, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.token_ids == y.token_ids
            torch.testing.assert_close(x.token_logprobs, y.token_logprobs, rtol=1e-4, atol=1e-4)
    assert 0 < stats.decode_kv_read < stats.decode_kv_live
