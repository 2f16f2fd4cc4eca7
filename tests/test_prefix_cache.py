"""Prefix caching over the paged KV cache: the block manager and the scheduler without a model, then the engine's outputs with
caching on against caching off (and HF `generate` on each prompt alone) on few-shot prompts, exact hit
counts, invalidation after an out-of-memory requeue, and a job's manifest counts."""

from __future__ import annotations

import random

import pyarrow.parquet as pq
import pytest
import torch

from fengshen_batch.engine.block_manager import BlockManager, block_hashes
from fengshen_batch.engine.kv_cache import BLOCK
from fengshen_batch.engine.llm_engine import LLMEngine
from fengshen_batch.engine.scheduler import DecodeStep, PrefillStep, Scheduler
from fengshen_batch.engine.sequence import Request
from fengshen_batch.job.run import run_job
from fengshen_batch.kinds.generation import PromptUsage, generate_tokens
from fengshen_batch.params import EngineParams, GenerateParams
from fengshen_batch.spec import build_spec
from fengshen_batch.tiny_model import SAMPLE_LINES
from tests.test_engine import _hf_greedy

HEADER = list(range(100, 140))  # 40 tokens: two full blocks and 8 more


def _chunks(step):
    return [(ch.request.ident, ch.start, ch.end) for ch in step.chunks]


def test_prompts_take_the_longest_cached_prefix_by_reference_and_prefill_the_rest():
    sched = Scheduler(num_blocks=40, max_seqs=4, token_budget=40, prefix_caching=True)
    a, b = Request("a", HEADER + [1, 2, 3], [0], 4), Request("b", HEADER + [4, 5], [0], 4)
    sched.add(a), sched.add(b)
    step = sched.schedule()
    assert _chunks(step) == [("a", 0, 40)]  # nothing cached yet; the budget is spent
    sched.prefilled(step)  # a's two full header blocks are written: findable from now on
    step = sched.schedule()
    # b's header is a's two blocks (a still prefilling), held by reference: only its tail is computed
    assert _chunks(step) == [("a", 40, 43), ("b", 32, 42)] and b.cached == 32
    shared = a.seqs[0].table[:2]
    assert b.seqs[0].table[:2] == shared and all(sched.blocks.ref[x] == 2 for x in shared)
    sched.prefilled(step)
    assert isinstance(sched.schedule(), DecodeStep)
    sched.finish(a.seqs[0])  # a lets go; b still holds the header
    assert all(sched.blocks.ref[x] == 1 for x in shared)
    c = Request("c", HEADER[:20] + [9], [0], 4)  # one block in common
    d = Request("d", HEADER, [0], 4)  # the whole header
    e = Request("e", HEADER[:32], [0], 4)  # exactly two blocks: the block of its last token is computed
    for r in (c, d, e):
        sched.add(r)
    step = sched.schedule()
    assert _chunks(step) == [("c", 16, 21), ("d", 32, 40), ("e", 16, 32)]
    assert [r.seqs[0].table[0] for r in (c, d, e)] == [shared[0]] * 3 and d.seqs[0].table[1] == shared[1]
    sched.prefilled(step)
    # after a failed step the requests start again; the registered blocks were never written by it, so
    # they are found again
    requeued = sched.requeue_all(shrink=False)
    assert {r.ident for r in requeued} == {"b", "c", "d", "e"} and sched.blocks.free_count == 39
    step = sched.schedule()
    assert _chunks(step)[0] == ("b", 32, 42)


def test_a_prompt_whose_header_is_being_computed_waits_a_step_and_finds_it():
    """Requests admitted in one step cannot read each other's blocks: one that would compute a block another
    is computing waits for the next step (and hits), while an unrelated one behind it is admitted past it."""
    sched = Scheduler(num_blocks=40, max_seqs=4, token_budget=200, prefix_caching=True)
    a, b = Request("a", HEADER + [1, 2, 3], [0], 4), Request("b", HEADER + [4, 5], [0], 4)
    c = Request("c", list(range(300, 320)), [0], 4)  # another header
    d = Request("d", HEADER[:10] + [7], [0], 4)  # no full block in common: nothing to wait for
    for r in (a, b, c, d):
        sched.add(r)
    step = sched.schedule()
    assert _chunks(step) == [("a", 0, 43), ("c", 0, 20), ("d", 0, 11)]
    assert [r.ident for r in sched.waiting] == ["b"]
    sched.prefilled(step)
    sched.schedule()  # a decode step for the running ones
    step = sched.schedule()
    assert _chunks(step) == [("b", 32, 42)] and b.cached == 32
    assert b.seqs[0].table[:2] == a.seqs[0].table[:2]


def test_a_freed_prefix_stays_findable_until_its_blocks_are_handed_out_again():
    sched = Scheduler(num_blocks=8, max_seqs=2, token_budget=100, prefix_caching=True)  # 7 blocks
    a = Request("a", HEADER + [1], [0], 1)
    sched.add(a)
    sched.prefilled(sched.schedule())
    sched.finish(a.seqs[0])  # all free again, the header blocks still registered
    b = Request("b", HEADER + [2], [0], 1)
    sched.add(b)
    step = sched.schedule()
    assert b.cached == 32 and b.seqs[0].table[:2] == a_table(sched, HEADER)
    sched.prefilled(step)
    sched.finish(b.seqs[0])
    other = Request("o", list(range(200, 300)), [0], 8)  # 7 blocks: takes every block, the header's too
    sched.add(other)
    sched.prefilled(sched.schedule())
    sched.finish(other.seqs[0])
    assert sched.blocks.cached(HEADER + [3], block_hashes(HEADER + [3])) == []


def a_table(sched, prompt):
    return sched.blocks.cached(prompt + [0], block_hashes(prompt + [0]))


def test_a_hash_collision_costs_a_hit_never_an_output():
    blocks = BlockManager(8, prefix_caching=True)
    prompt = HEADER + [1]
    table = blocks.allocate([], 3, holders=1)
    blocks.register(table, prompt, block_hashes(prompt), len(prompt))
    blocks.release(table)
    other = [7] * len(prompt)  # other tokens, given the first prompt's hashes as if they collided
    assert blocks.cached(other, block_hashes(prompt)) == []
    assert len(blocks.cached(prompt, block_hashes(prompt))) == 2


# -- the engine on few-shot prompts: one shared header, short row parts, per-row limits


def _few_shot(replica):
    """14 prompts of the tiny model (context 64): a 36-token header (two full blocks) + 3..11 row tokens."""
    header = replica.encode(SAMPLE_LINES[5] + " " + SAMPLE_LINES[6])[:36]
    rows = [replica.encode(line)[: 3 + i % 9] for i, line in enumerate(SAMPLE_LINES + SAMPLE_LINES[:2])]
    limits = [2 + (5 * i) % 12 for i in range(len(rows))]
    return [header + r for r in rows], limits


def _run(replica, params, caching, prompts, limits, order=None, seqs=16, budget=None, usage=None):
    order = order or list(range(len(prompts)))
    engine = LLMEngine(replica, params, EngineParams(max_num_seqs=seqs, enable_prefix_caching=caching),
                       token_budget=budget)  # fmt: skip
    got = generate_tokens(replica, [prompts[i] for i in order], [f"r{i}" for i in order], params,
                          [limits[i] for i in order], engine=engine, usage=usage)  # fmt: skip
    back = [None] * len(prompts)
    for i, samples in zip(order, got, strict=True):
        back[i] = samples
    return back, engine.stats


def _same(a, b):
    """Bit for bit on CPU: a cached prefix is the K/V its prompt would compute, and every step's rows get
    the same bits whatever runs beside them (gpt2.MIN_ROWS)."""
    assert [[(s.sample_index, s.token_ids, s.token_logprobs, s.finish_reason) for s in x] for x in a] == [
        [(s.sample_index, s.token_ids, s.token_logprobs, s.finish_reason) for s in y] for y in b
    ]


@pytest.mark.parametrize(
    "params",
    [
        GenerateParams(greedy=True, max_new_tokens=12),
        GenerateParams(
            max_new_tokens=12,
            seed=7,
            temperature=0.9,
            top_p=0.9,
            num_return_sequences=3,
            repetition_penalty=1.2,
            stop=("ing",),
        ),  # fmt: skip
    ],
    ids=["greedy", "sampled-n3-stop-penalty"],
)
def test_outputs_equal_with_caching_on_and_off_whatever_the_engine(replica, hf_model, params):
    prompts, limits = _few_shot(replica)
    off, off_stats = _run(replica, params, False, prompts, limits)
    assert off_stats.cached_tokens == 0 and off_stats.prefill_tokens == off_stats.prompt_tokens
    shuffled = list(range(len(prompts)))
    random.Random(5).shuffle(shuffled)
    # one sequence (every prompt after the first finds the header in freed blocks), 3 sequences, a budget
    # smaller than the header (chunked prompts share blocks of a prompt still prefilling)
    for seqs, budget, order in ((1, None, None), (3, 40, shuffled), (16, 20, None), (16, 45, shuffled)):
        on, stats = _run(replica, params, True, prompts, limits, order, seqs, budget)
        _same(on, off)
        assert stats.cached_tokens >= 32 * (len(prompts) // 2)
        assert stats.prefill_tokens == stats.prompt_tokens - stats.cached_tokens
    if params.greedy:  # and against HF's own generate, each prompt alone
        for prompt, limit, (s,) in list(zip(prompts, limits, on, strict=True))[:6]:
            assert s.token_ids == _hf_greedy(replica, hf_model, prompt, limit)


def test_hits_are_counted_exactly(replica):
    prompts, limits = _few_shot(replica)
    params = GenerateParams(max_new_tokens=8, seed=1, num_return_sequences=2)
    usage = PromptUsage()
    # the first prompt alone fills the first step's budget: every later one finds both header blocks
    _, stats = _run(replica, params, True, prompts, limits, seqs=32, budget=len(prompts[0]), usage=usage)
    assert stats.cached_tokens == usage.cached_tokens == 32 * (len(prompts) - 1)
    assert stats.prompt_tokens == usage.prompt_tokens == sum(len(p) for p in prompts)
    assert stats.prefill_tokens == stats.prompt_tokens - stats.cached_tokens


def test_out_of_memory_requeue_changes_nothing_and_keeps_the_written_prefixes(replica):
    prompts, limits = _few_shot(replica)
    params = GenerateParams(max_new_tokens=10, seed=9, temperature=0.7)
    expected, _ = _run(replica, params, False, prompts, limits)
    engine = LLMEngine(replica, params, EngineParams(max_num_seqs=6), token_budget=60)
    real_prefill, calls = engine.runner.prefill, []

    def flaky(step):
        calls.append(step)
        if len(calls) == 4:
            raise torch.OutOfMemoryError("simulated")
        return real_prefill(step)

    engine.runner.prefill = flaky
    got = generate_tokens(replica, prompts, [f"r{i}" for i in range(len(prompts))], params, limits,
                          engine=engine)  # fmt: skip
    _same(got, expected)
    assert engine.stats.oom_backoffs == 1 and engine.stats.cached_tokens > 0
    assert engine.scheduler.blocks.free_count == engine.cache.blocks - 1


@pytest.mark.usefixtures("ray_cluster")
def test_a_few_shot_job_counts_its_hits_and_equals_the_job_without_caching(tmp_path, replica):
    import pyarrow as pa

    header = " ".join(SAMPLE_LINES[5:7]) + " "  # 39 tokens: the prompts fit the context whole
    (tmp_path / "in").mkdir()
    topics = [line.split()[0] for line in SAMPLE_LINES[5:]] * 3
    pq.write_table(pa.table({"id": [f"t{i}" for i in range(len(topics))], "topic": topics}),
                   tmp_path / "in" / "t.parquet")  # fmt: skip
    common = {"kind": "generate", "model": str(replica.source), "input": str(tmp_path / "in"),
              "prompt_template": header + "{topic}:", "max_new_tokens": 6, "num_return_sequences": 2,
              "seed": 3, "temperature": 0.9, "shard_rows": 8, "max_num_seqs": 8,
              "token_budget": 16}  # fmt: skip
    on = run_job(build_spec({**common, "output": str(tmp_path / "on"), "actors": 2}), progress=lambda _: None)
    off = run_job(build_spec({**common, "output": str(tmp_path / "off"), "enable_prefix_caching": False}),
                  progress=lambda _: None)  # fmt: skip
    a, b = (pq.read_table(tmp_path / d / "data").sort_by([("id", "ascending"), ("sample_index", "ascending")])
            for d in ("on", "off"))  # fmt: skip
    assert a.select(["id", "sample_index", "generation", "generated_tokens"]).equals(
        b.select(["id", "sample_index", "generation", "generated_tokens"])
    )
    prompt_tokens = sum(a.column("prompt_tokens").to_pylist()) // 2  # one prefill per prompt, 2 samples
    for manifest in (on, off):
        assert manifest["counts"]["prompt_tokens"] == prompt_tokens
    counts = on["counts"]
    assert counts["cached_prompt_tokens"] + counts["prefilled_prompt_tokens"] == prompt_tokens
    assert on["prefix_cache_hit_rate"] == round(counts["cached_prompt_tokens"] / prompt_tokens, 4) > 0.5
    assert off["counts"]["cached_prompt_tokens"] == 0 == off["prefix_cache_hit_rate"]


def test_every_read_finds_what_its_tokens_would_compute_under_random_schedules():
    """No model: a shadow cache records, for each block position, the tokens its K/V was computed from
    (prefill chunks, decode writes, copies on write, preemption, failed steps that leave garbage). Before every
    prefill chunk the positions its prompt takes from the cache, and at every decode step every position a
    running sequence reads, must hold exactly its own tokens."""
    rng = random.Random(7)
    hits = preempted = 0
    for trial in range(40):
        num_blocks = rng.choice([8, 10, 12, 20, 64])
        sched = Scheduler(
            num_blocks, rng.choice([1, 2, 3, 5, 8]), rng.choice([7, 16, 40, 200]), prefix_caching=True
        )
        shadow = [[None] * BLOCK for _ in range(num_blocks)]  # block -> offset -> tokens up to that position
        heads = [[rng.randrange(1, 50) for _ in range(rng.randrange(0, 60))] for _ in range(3)]
        reqs = []
        for i in range(rng.randrange(5, 25)):
            prompt = rng.choice(heads) + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 20))]
            req = Request(i, prompt, list(range(rng.choice([1, 1, 2, 3]))), rng.randrange(1, 60))
            if sched.fits_alone(req):
                reqs.append(req)
                sched.add(req)

        def holds(seq_tokens, table, upto, shadow=shadow):
            return all(
                shadow[table[p // BLOCK]][p % BLOCK] == tuple(seq_tokens[: p + 1]) for p in range(upto)
            )

        while sched.has_work():
            step = sched.schedule()
            if rng.random() < 0.05:  # a failed step: what it would write is garbage
                if isinstance(step, PrefillStep):
                    for ch in step.chunks:
                        for p in range(ch.start, ch.end):
                            shadow[ch.request.seqs[0].table[p // BLOCK]][p % BLOCK] = "garbage"
                else:
                    for s, d in step.copies:
                        shadow[d] = list(shadow[s])
                    for seq in step.seqs:
                        shadow[seq.table[seq.position // BLOCK]][seq.position % BLOCK] = "garbage"
                sched.requeue_all(shrink=False)
                continue
            if isinstance(step, PrefillStep):
                for ch in step.chunks:
                    table = ch.request.seqs[0].table
                    assert holds(ch.request.prompt, table, ch.start), (trial, ch)
                    hits += ch.start if ch.start == ch.request.cached else 0
                    for p in range(ch.start, ch.end):
                        shadow[table[p // BLOCK]][p % BLOCK] = tuple(ch.request.prompt[: p + 1])
                for req in sched.prefilled(step):
                    _sample(sched, req.seqs, rng, 0.03)  # a sample's first token comes from its prefill
                continue
            for s, d in step.copies:
                shadow[d] = list(shadow[s])
            for seq in step.seqs:
                tokens = seq.request.prompt + seq.tokens
                assert holds(tokens, seq.table, seq.position), (trial, seq.request.ident)
                shadow[seq.table[seq.position // BLOCK]][seq.position % BLOCK] = tuple(tokens)
            _sample(sched, step.seqs, rng, 0.03)
        preempted += sched.preemptions
        assert all(r.done for r in reqs) and sched.blocks.free_count == num_blocks - 1
    assert hits > 1000 and preempted > 10  # prefixes were found, and sequences preempted, many times


def _sample(sched, seqs, rng, p_end=0.2):
    for seq in seqs:
        seq.tokens.append(0)
        if len(seq.tokens) >= seq.request.max_new_tokens or rng.random() < p_end:
            sched.finish(seq)


def test_judge_rows_that_open_alike_score_their_opening_once_and_equal_lm_eval(
    replica, hf_model, monkeypatch
):
    from fengshen_batch.kinds import prefix_scoring
    from fengshen_batch.kinds.judging import judge
    from fengshen_batch.kinds.scoring import score_tokens
    from tests.test_judge_report import _lm_eval_nll

    rows = [
        [f"{SAMPLE_LINES[5]} {a}" for a in ("Aspirin.", "Insulin helps", "Beijing")],  # a 20-token opening
        ["Beijing.", "Paris."],  # nothing in common: the dense pass
        [SAMPLE_LINES[1], SAMPLE_LINES[1] + "吗"],  # one statement is the other's opening
        [SAMPLE_LINES[7]],  # alone
    ]
    seen = []
    real = prefix_scoring.score_shared
    monkeypatch.setattr(prefix_scoring, "score_shared", lambda r, g, b: seen.append(g) or real(r, g, b))
    results, _ = judge(replica, rows, "ppl", token_budget=64)
    assert [len(g) for g in seen[0]] == [3, 2]  # rows 0 and 2 went the cached way, in one call
    for statements, judgment in zip(rows, results, strict=True):
        got = [s.nll_sum for s in judgment.scores]
        assert got == pytest.approx(_lm_eval_nll(replica, hf_model, statements), rel=1e-4)
        dense, _ = score_tokens(replica, [replica.encode(s) for s in statements])
        assert got == pytest.approx([d[0] for d in dense], rel=1e-6)
        assert [s.token_count for s in judgment.scores] == [d[1] for d in dense]


def test_a_rows_linear_bits_do_not_depend_on_how_many_rows_share_the_step():
    """CPU GEMMs change kernels below ~a dozen rows and again past ~176 (K=1,024, N=256 on 2 cores): a row
    of a big prefill or decode step would get other last bits than the same row in a small one, and caching
    on vs off (which changes the steps' sizes) would show it. `_linear` pads small inputs and blocks big ones."""
    from fengshen_batch.engine.gpt2 import GPT2

    torch.manual_seed(0)
    linear = GPT2._linear.__get__(object.__new__(GPT2))  # (it uses no state)
    for k, n in ((1024, 256), (256, 1024), (256, 768)):
        w, b, x = torch.randn(k, n), torch.randn(n), torch.randn(700, k)
        alone = torch.cat([linear(x[i : i + 1], w, b) for i in range(0, 700, 50)])  # each row on its own
        for rows in (3, 16, 100, 176, 300, 700):
            assert torch.equal(linear(x[:rows], w, b)[::50], alone[: (rows + 49) // 50]), (k, n, rows)
