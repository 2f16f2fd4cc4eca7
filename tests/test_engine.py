"""The continuous-batching engine: our GPT2 forward against HF logits, the scheduler with no model at all,
the sampler's candidate path against the full one, stop strings on bytes, per-row limits, and the engine's
results against HF `generate` on each prompt alone whatever the slots, budget and admission order."""

from __future__ import annotations

import threading

import pytest
import torch

from fengshen_batch.engine.gpt2 import Group
from fengshen_batch.engine.kv_cache import BLOCK, KVCache
from fengshen_batch.engine.llm_engine import EngineThread, LLMEngine
from fengshen_batch.engine.sampler import CANDIDATES, sample, sample_full, sample_key
from fengshen_batch.engine.scheduler import DecodeStep, PrefillStep, Scheduler
from fengshen_batch.engine.sequence import Request
from fengshen_batch.engine.stop import StopChecker, token_bytes
from fengshen_batch.kinds.generation import generate
from fengshen_batch.params import EngineParams, GenerateParams
from fengshen_batch.tiny_model import SAMPLE_LINES

PROMPTS = [line * (1 + i % 3) for i, line in enumerate(SAMPLE_LINES)]  # 12 prompts, mixed lengths


def _prompt_ids(replica, limit):
    return [replica.encode(p)[-(replica.max_length - limit) :] for p in PROMPTS]


def _hf_greedy(replica, hf_model, ids, limit):
    enc = torch.tensor([ids])
    out = hf_model.generate(enc, attention_mask=torch.ones_like(enc), do_sample=False,
                                 max_new_tokens=limit, pad_token_id=replica.eos_id)  # fmt: skip
    gen = out[0, enc.shape[1] :].tolist()
    return gen[: gen.index(replica.eos_id) + 1] if replica.eos_id in gen else gen


def test_gpt2_forward_equals_hf_logits_through_chunked_prefill_and_decode(replica, hf_model):
    """Three sequences in scattered KV blocks (tables out of order): chunked prefill of unequal chunks, then
    decode in two groups of different span, each position's logits equal to HF's."""
    model = replica.model
    cache = KVCache(model.n_layer, 16, model.n_head, model.head_dim, model.dtype, model.device)
    seqs = [replica.encode(p)[:40] for p in (PROMPTS[1], PROMPTS[5], PROMPTS[7])]  # lengths differ
    tables = [[9, 2, 14], [5, 11, 1], [3, 15, 7]]  # 3 blocks of 16 each: positions 0..47
    with torch.no_grad():
        ref = [hf_model(torch.tensor([s])).logits[0].float() for s in seqs]  # (T, V) each
        # Prefill the first 10 tokens of each, then 5 more each.
        for start, end in ((0, 10), (10, 15)):
            tokens = [t for s in seqs for t in s[start:end]]
            n = end - start
            seq_idx = torch.arange(3).repeat_interleave(n)
            last = torch.arange(1, 4) * n - 1
            groups = [Group(0, 3, 0, 3 * n, n, 2 * BLOCK)]
            logits = model.prefill(cache, torch.tensor(tokens), seq_idx, torch.arange(n).repeat(3),
                                   torch.tensor(tables), torch.full((3,), start), groups, last)  # fmt: skip
            for b in range(3):
                torch.testing.assert_close(logits[b], ref[b][end - 1], rtol=1e-4, atol=1e-4)
        # Decode with teacher forcing: sequence 0 alone in a short group, the others in a longer one.
        for pos in range(15, 25):
            ids = torch.tensor([s[pos] for s in seqs])
            p = torch.full((3,), pos)
            span = -(-(pos + 1) // BLOCK) * BLOCK
            logits = model.decode(cache, ids, p, torch.tensor(tables), [(0, 1, span), (1, 3, 3 * BLOCK)])
            for b in range(3):
                torch.testing.assert_close(logits[b], ref[b][pos], rtol=1e-4, atol=1e-4)


def _req(n_tokens, n=1, limit=4, ident=0):
    return Request(ident, list(range(1, n_tokens + 1)), list(range(n)), limit)


def test_scheduler_admits_chunks_and_alternates_without_a_model():
    sched = Scheduler(num_blocks=40, max_seqs=3, token_budget=10)
    a, b, c = _req(4, n=2, ident="a"), _req(25, ident="b"), _req(3, ident="c")
    for r in (a, b, c):
        sched.add(r)
    step = sched.schedule()
    assert isinstance(step, PrefillStep)
    assert [(ch.request.ident, ch.start, ch.end) for ch in step.chunks] == [("a", 0, 4), ("b", 0, 6)]
    assert [s.slot for s in a.seqs] == [0, 1] and b.seqs[0].slot == 2
    assert a.seqs[0].table == a.seqs[1].table and len(b.seqs[0].table) == 2  # shared; 25 tokens: 2 blocks
    assert sched.prefilled(step) == [a]  # a's prompt is whole: both samples run; b is half done
    step = sched.schedule()  # running sequences and a prefill pending: a decode comes first
    assert isinstance(step, DecodeStep) and [s.slot for s in step.seqs] == [0, 1]
    # a's prompt ends mid-block: one sample writes it in place, the other gets its own copy first
    assert len(step.copies) == 1 and a.seqs[0].table != a.seqs[1].table
    step = sched.schedule()  # c waits: no free row; b continues within the budget
    assert [(ch.request.ident, ch.start, ch.end) for ch in step.chunks] == [("b", 6, 16)]
    sched.prefilled(step)
    sched.finish(a.seqs[0])  # its row and its blocks free at once
    assert isinstance(sched.schedule(), DecodeStep)
    step = sched.schedule()
    assert [(ch.request.ident, ch.start, ch.end) for ch in step.chunks] == [("b", 16, 25), ("c", 0, 1)]
    assert c.seqs[0].slot == 0  # the lowest free row
    sched.prefilled(step)
    dec = sched.schedule()
    assert [s.request.ident for s in dec.seqs] == ["a", "b"]  # c is still prefilling: no empty rows
    requeued = sched.requeue_all(shrink=True)
    assert {r.ident for r in requeued} == {"a", "b", "c"} and sched.cap == 1
    assert list(sched.waiting)[0].prefilled == 0 and len(sched.free) == 3
    assert sched.blocks.free_count == 39  # every block back


def test_preemption_when_blocks_run_out_puts_the_newest_back_from_scratch():
    """Two requests whose samples outgrow the blocks: the newest is preempted (its blocks released, back at
    the front of the queue) and runs again once there is room; the oldest runs to its limit."""
    sched = Scheduler(num_blocks=7, max_seqs=4, token_budget=64)  # 6 blocks of 16 tokens
    old, new = _req(20, limit=40, ident="old"), _req(20, limit=40, ident="new")
    sched.add(old)
    sched.add(new)
    preempted = False
    while sched.has_work():
        step = sched.schedule()
        if isinstance(step, PrefillStep):
            for req in sched.prefilled(step):
                req.seqs[0].tokens.append(1)  # the first token comes from the prefill's logits
            continue
        for seq in step.seqs:
            seq.tokens.append(1)
            if len(seq.tokens) >= seq.request.max_new_tokens:
                sched.finish(seq)
        preempted |= new.seqs[0].status.value == "waiting"
    assert preempted and sched.preemptions >= 1
    assert len(old.seqs[0].tokens) == len(new.seqs[0].tokens) == 40
    assert sched.blocks.free_count == 6


def test_candidate_sampling_equals_the_full_vocabulary_path():
    torch.manual_seed(0)
    V = 4 * CANDIDATES
    peaked = torch.randn(64, V) * 4  # nucleus well inside the candidates
    flat = torch.randn(8, V) * 0.01  # nucleus far past them: must be flagged for a redraw
    keys = torch.tensor([sample_key(1, f"r{i}", 0) for i in range(72)])
    steps = torch.arange(72)
    logits = torch.cat([peaked, flat])
    for params in (GenerateParams(temperature=0.8, top_p=0.9), GenerateParams(top_k=50, top_p=0.8),
                   GenerateParams(top_k=7), GenerateParams(temperature=1.3)):  # fmt: skip
        tokens, redraw = sample(logits, keys, steps, params)
        full = sample_full(logits, keys, steps, params)
        ok = torch.ones(72, dtype=torch.bool) if redraw is None else ~redraw
        assert torch.equal(tokens[ok], full[ok])
        if params.top_p < 1 and not params.top_k:
            assert not redraw[:64].any() and redraw[64:].all()


def test_the_cpu_sort_of_probabilities_by_their_bits_is_the_float_sort():
    """sample_full sorts float32 probabilities as int32 bit patterns on CPU: the same values in the same
    order as a float sort, zeros (an underflowed softmax) and a row of ties included."""
    from fengshen_batch.engine.sampler import _sort_descending

    torch.manual_seed(0)
    probs = torch.cat([(torch.randn(6, 3000) * 3).softmax(-1), (torch.randn(1, 3000) * 200).softmax(-1),
                       torch.full((1, 3000), 1 / 3000)])  # fmt: skip
    assert (probs == 0).any()
    assert torch.equal(_sort_descending(probs), torch.sort(probs, dim=-1, descending=True).values)


def test_tied_probabilities_draw_the_token_a_stable_sort_puts_there():
    """Draws name tokens by value: among tokens of equal probability, the one at the drawn rank of a stable
    descending sort. The candidates and the full sort then agree, ties straddling the candidates included."""
    torch.manual_seed(0)
    V = 4 * CANDIDATES
    logits = torch.randn(6, V) * 4
    logits[0, :40] = logits[0].max() + 1  # 40 tied leaders
    logits[1, 10 : 10 + 2 * CANDIDATES] = 5.0  # a tie group that straddles the candidates: flat, a redraw
    logits[2] = 0.0  # a row of ties
    n = 2000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    params = GenerateParams(temperature=0.9, top_p=0.9)
    for row in range(3):
        probs = (logits[row] / 0.9).softmax(-1).expand(n, -1)
        sorted_ = torch.sort(probs[:1], dim=-1, descending=True, stable=True)
        cum = sorted_.values.double().cumsum(-1)[0]
        kept = int((cum < params.top_p).sum()) + 1
        mass = cum[kept - 1]
        want = sorted_.indices[0, torch.searchsorted(cum, u * mass).clamp(max=kept - 1)]
        assert torch.equal(sample_full(logits[row].expand(n, -1), None, None, params, u=u), want)
    keys = torch.tensor([sample_key(2, f"r{i}", 0) for i in range(6)])
    tokens, redraw = sample(logits, keys, torch.zeros(6, dtype=torch.long), params)
    ok = ~redraw
    assert ok[0] and not ok[1]
    assert torch.equal(tokens[ok], sample_full(logits, keys, torch.zeros(6, dtype=torch.long), params)[ok])


def test_stop_strings_are_found_in_the_new_bytes_even_across_tokens(replica):
    ids = replica.encode("北京位于华北平原的北部")
    table = token_bytes(replica.tokenizer, replica.model.vocab_size)
    assert b"".join(table[i] for i in ids).decode() == replica.tokenizer.decode(ids)
    # a stop string whose bytes begin inside one token and end inside a later one
    text = b"".join(table[i] for i in ids)
    start = len(table[ids[0]]) - 1
    stop = text[start : start + 4].decode(errors="ignore") or "华北"
    checker = StopChecker(replica.tokenizer, [stop, "never"], replica.model.vocab_size)
    seq = _req(1).seqs[0]
    hits = [checker.update(seq, t) for t in ids]
    first = hits.index(True)
    assert stop in replica.tokenizer.decode(ids[: first + 1])
    assert stop not in replica.tokenizer.decode(ids[:first])


def test_greedy_with_per_row_limits_equals_hf_for_more_prompts_than_slots(replica, hf_model):
    params = GenerateParams(greedy=True, max_new_tokens=12)
    limits = [3, 12, None, 7, 1, 20, 9, 12, 2, 15, 5, 11]  # None: the job's 12
    engine = LLMEngine(replica, params, EngineParams(max_num_seqs=3), token_budget=24)
    results = generate(replica, PROMPTS, [str(i) for i in range(12)], params, limits, engine=engine)
    for prompt, limit, (s,) in zip(PROMPTS, limits, results, strict=True):
        limit = limit or 12
        ids = replica.encode(prompt)[-(replica.max_length - limit) :]
        ref = _hf_greedy(replica, hf_model, ids, limit)
        assert s.generated_tokens == len(ref) <= limit
        assert s.generation == replica.tokenizer.decode([t for t in ref if t != replica.eos_id])
        assert s.prompt_tokens == len(ids)
        assert s.finish_reason == ("stop" if ref[-1] == replica.eos_id else "length")
    stats = engine.stats
    assert stats.prefill_steps > 4  # admitted over many steps, prompts split into chunks
    # one host sync per decode step, and one per prefill step that completes a prompt (none otherwise)
    assert stats.decode_steps <= stats.host_syncs <= stats.decode_steps + stats.prefill_steps
    assert stats.decode_tokens + 12 == sum(s.generated_tokens for (s,) in results)


def test_bad_per_row_limits_are_row_errors(replica):
    params = GenerateParams(greedy=True, max_new_tokens=8)
    ctx = replica.max_length
    limits = [0, -3, 2.5, "7", True, ctx, 4.0, float("nan"), None, ctx - 1]
    results = generate(
        replica, ["北京位于"] * len(limits), [str(i) for i in range(len(limits))], params, limits
    )
    kinds = [r.kind if not isinstance(r, list) else None for r in results]
    assert kinds[:6] == ["bad_max_new_tokens"] * 6
    assert "outside 1.." in results[5].message and "not a whole number" in results[2].message
    assert all(r[0].generated_tokens <= n for r, n in zip(results[6:], (4, 8, 8, ctx - 1), strict=True))
    long_prompt = "".join(SAMPLE_LINES)
    (kept,) = generate(replica, [long_prompt], ["x"], params, [ctx - 1])
    assert kept[0].prompt_tokens == 1  # left truncation leaves room for the row's own limit


def _samples(engine, requests):
    engine.run(requests)
    return [[s.tokens for s in r.seqs] for r in requests]


def _requests(replica, params, n):
    prompts = _prompt_ids(replica, params.max_new_tokens)
    return [Request(i, p, [sample_key(params.seed, f"id{i}", s) for s in range(n)], params.max_new_tokens)
            for i, p in enumerate(prompts)]  # fmt: skip


def test_samples_are_the_same_whatever_runs_beside_them(replica):
    params = GenerateParams(max_new_tokens=10, seed=3, temperature=0.8, top_p=0.95, repetition_penalty=1.1)
    base = _samples(LLMEngine(replica, params, EngineParams(max_num_seqs=64)), _requests(replica, params, 3))
    for seqs, budget in ((4, 16), (64, 7)):
        got = _samples(LLMEngine(replica, params, EngineParams(max_num_seqs=seqs), token_budget=budget),
                       _requests(replica, params, 3))  # fmt: skip
        assert got == base
    # sample index 2 of a prompt, generated alone, equals the third of its three samples
    one = _requests(replica, params, 3)[4]
    alone = Request(4, one.prompt, one.keys[2:], one.max_new_tokens, first_index=2)
    assert _samples(LLMEngine(replica, params, EngineParams(max_num_seqs=1)), [alone]) == [[base[4][2]]]
    assert len({tuple(t) for t in base[4]}) > 1


def test_engine_thread_serves_concurrent_callers_and_survives_a_failed_step(replica):
    params = GenerateParams(max_new_tokens=8, seed=5, temperature=0.9)
    expected = _samples(
        LLMEngine(replica, params, EngineParams(max_num_seqs=8)), _requests(replica, params, 2)
    )
    engine = LLMEngine(replica, params, EngineParams(max_num_seqs=4), token_budget=32)
    worker = EngineThread(engine)
    try:
        reqs = _requests(replica, params, 2)
        parts = [reqs[0:5], reqs[5:9], reqs[9:]]
        threads = [threading.Thread(target=worker.run, args=(part,)) for part in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [[s.tokens for s in r.seqs] for r in reqs] == expected

        real = engine.runner.decode
        engine.runner.decode = lambda step: (_ for _ in ()).throw(RuntimeError("boom"))
        with pytest.raises(RuntimeError, match="boom"):
            worker.run(_requests(replica, params, 2)[:3])
        engine.runner.decode = real
        assert not engine.has_work() and len(engine.scheduler.free) == 4
        assert engine.scheduler.blocks.free_count == engine.cache.blocks - 1
        again = _requests(replica, params, 2)
        worker.run(again)
        assert [[s.tokens for s in r.seqs] for r in again] == expected
    finally:
        worker.close()


def test_out_of_memory_admits_fewer_sequences_and_loses_nothing(replica):
    params = GenerateParams(max_new_tokens=10, seed=9, temperature=0.7)
    expected = _samples(
        LLMEngine(replica, params, EngineParams(max_num_seqs=8)), _requests(replica, params, 1)
    )
    engine = LLMEngine(replica, params, EngineParams(max_num_seqs=8))
    real, calls = engine.runner.decode, []

    def flaky(step):
        calls.append(len(step.seqs))
        if len(calls) == 3:
            raise torch.OutOfMemoryError("simulated")
        return real(step)

    engine.runner.decode = flaky
    assert _samples(engine, _requests(replica, params, 1)) == expected
    assert engine.stats.oom_backoffs == 1 and engine.scheduler.cap == 4
    assert max(calls[3:]) <= 4


def test_bucketed_decode_path_pads_without_touching_other_slots(replica):
    """The CUDA-graph path's static buffers and bucket padding, run eagerly here (no GPU): padded rows write
    the null block only, so results equal the exact-width path while prompts prefill beside."""
    params = GenerateParams(max_new_tokens=9, seed=2, temperature=0.9, num_return_sequences=2)
    expected = _samples(
        LLMEngine(replica, params, EngineParams(max_num_seqs=16)), _requests(replica, params, 2)
    )
    engine = LLMEngine(replica, params, EngineParams(max_num_seqs=7), token_budget=20)
    runner, shapes = engine.runner, []

    def eager_capture(B, S):
        shapes.append((B, S))
        out = torch.empty(B, runner.model.vocab_size)
        return (lambda: out.copy_(runner.model.decode(runner.cache, *runner._inputs(B, S)))), out

    runner.graphs_on, runner.bucketed, runner._capture = True, True, eager_capture
    assert _samples(engine, _requests(replica, params, 2)) == expected
    assert shapes and all(
        B in runner.buckets and (S % 128 == 0 or -(-replica.max_length // BLOCK) * BLOCK == S)
        for B, S in shapes
    )
    assert any(B > 1 for B, _ in shapes)


def test_blocks_running_out_preempt_and_change_no_output(replica):
    """A KV cache of three contexts for many long samples: sequences are preempted and rerun, decode
    computes no empty rows, and every sample equals the one an ample engine makes."""
    params = GenerateParams(max_new_tokens=30, seed=4, temperature=0.9, repetition_penalty=1.2)
    expected = _samples(
        LLMEngine(replica, params, EngineParams(max_num_seqs=16)), _requests(replica, params, 2)
    )
    model = replica.model
    per_block = 2 * model.n_layer * model.d * BLOCK * 4  # float32 K and V
    tight = EngineParams(max_num_seqs=16, cpu_kv_cache_gb=3 * (model.max_len // BLOCK) * per_block / 2**30)
    engine = LLMEngine(replica, params, tight)
    assert _samples(engine, _requests(replica, params, 2)) == expected
    assert engine.stats.preemptions > 0 and engine.stats.decode_slots == engine.stats.decode_tokens
    assert engine.scheduler.blocks.free_count == engine.cache.blocks - 1
