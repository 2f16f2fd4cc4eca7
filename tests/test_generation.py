"""Generation: greedy equals HF `generate` on each prompt alone; samples are reproducible per (seed, id, index)."""

from __future__ import annotations

import random

import pytest
import torch
from pydantic import ValidationError
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from fengshen_batch.engine import sampler
from fengshen_batch.engine.llm_engine import LLMEngine
from fengshen_batch.engine.sampler import penalize, sample_full, sample_key
from fengshen_batch.kinds.generation import generate
from fengshen_batch.kinds.rows import RowError
from fengshen_batch.params import EngineParams, GenerateParams
from fengshen_batch.tiny_model import SAMPLE_LINES

PROMPTS = ["北京位于", "Diabetics should not eat", SAMPLE_LINES[2], "a", SAMPLE_LINES[3] + SAMPLE_LINES[4]]
IDS = [f"row-{i}" for i in range(len(PROMPTS))]


def _hf_greedy(replica, hf_model, prompt_ids, max_new_tokens, repetition_penalty=1.0):
    enc = torch.tensor([prompt_ids])
    out = hf_model.generate(
        enc,
        attention_mask=torch.ones_like(enc),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        repetition_penalty=repetition_penalty,
        pad_token_id=replica.eos_id,
    )
    gen = out[0, enc.shape[1] :].tolist()
    return gen[: gen.index(replica.eos_id) + 1] if replica.eos_id in gen else gen


def _teacher_forced_nll(hf_model, prompt_ids, gen_ids):
    """Independent NLL of generated tokens: one forward pass over prompt + generation."""
    ids = torch.tensor([prompt_ids + gen_ids])
    with torch.no_grad():
        logprobs = hf_model(ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    return -logprobs.gather(1, targets[:, None])[len(prompt_ids) - 1 :].sum().item()


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_greedy_equals_hf_generate_on_each_prompt_alone(replica, hf_model, repetition_penalty):
    params = GenerateParams(greedy=True, max_new_tokens=20, repetition_penalty=repetition_penalty)
    results = generate(replica, PROMPTS, IDS, params)
    limit = replica.max_length - params.max_new_tokens
    reasons = set()
    for prompt, (sample,) in zip(PROMPTS, results, strict=True):
        prompt_ids = replica.encode(prompt)[-limit:]
        ref = _hf_greedy(replica, hf_model, prompt_ids, params.max_new_tokens, repetition_penalty)
        assert sample.generation == replica.tokenizer.decode([t for t in ref if t != replica.eos_id])
        assert sample.generated_tokens == len(ref)
        assert sample.prompt_tokens == len(prompt_ids)
        assert sample.generation_nll_sum == pytest.approx(
            _teacher_forced_nll(hf_model, prompt_ids, ref), rel=1e-4
        )
        reasons.add(sample.finish_reason)
        assert sample.finish_reason == ("stop" if ref[-1] == replica.eos_id else "length")
    assert len(replica.encode(PROMPTS[-1])) > limit  # left truncation exercised


SAMPLING = GenerateParams(
    max_new_tokens=12, num_return_sequences=3, seed=7, temperature=0.9, top_p=0.95, top_k=40
)


def _texts(results):
    return [[(s.sample_index, s.generation, s.generated_tokens) for s in r] for r in results]


def test_samples_do_not_depend_on_engine_size_budget_or_order(replica):
    base = generate(replica, PROMPTS, IDS, SAMPLING)
    order = list(range(len(PROMPTS)))
    random.Random(3).shuffle(order)
    for seqs, budget in ((1, 16), (4, 40), (64, 150)):
        engine = LLMEngine(replica, SAMPLING, EngineParams(max_num_seqs=seqs), token_budget=budget)
        got = generate(replica, [PROMPTS[i] for i in order], [IDS[i] for i in order], SAMPLING, engine=engine)
        assert _texts(got) == _texts([base[i] for i in order])
    alone = [generate(replica, [p], [i], SAMPLING)[0] for p, i in zip(PROMPTS, IDS, strict=True)]
    assert _texts(alone) == _texts(base)
    for row in base:
        assert [s.sample_index for s in row] == [0, 1, 2]


def test_seed_row_id_and_sample_index_change_the_sample(replica):
    base = generate(replica, PROMPTS, IDS, SAMPLING)
    other_seed = generate(replica, PROMPTS, IDS, SAMPLING.model_copy(update={"seed": 8}))
    other_ids = generate(replica, PROMPTS, [i + "x" for i in IDS], SAMPLING)
    assert _texts(other_seed) != _texts(base)
    assert _texts(other_ids) != _texts(base)
    for row in base:  # the three samples of one prompt differ from one another
        assert len({s.generation for s in row}) > 1


def test_stop_string_cuts_text_and_counts(replica, hf_model):
    greedy = GenerateParams(greedy=True, max_new_tokens=20)
    (full,) = generate(replica, [PROMPTS[1]], ["x"], greedy)
    full = full[0]
    stop = full.generation[6:8]
    assert stop and full.generation_nll_sum > 0
    (cut,) = generate(replica, [PROMPTS[1]], ["x"], greedy.model_copy(update={"stop": (stop, "never-seen")}))
    cut = cut[0]
    assert cut.generation == full.generation[: full.generation.find(stop)]
    assert cut.finish_reason == "stop"
    assert cut.generated_tokens < full.generated_tokens
    # the tokens counted are the fewest whose text contains the stop string
    gen_ids = replica.encode(PROMPTS[1])  # recompute the greedy ids to check the count and the NLL
    ids = _hf_greedy(replica, hf_model, gen_ids, 20)[: cut.generated_tokens]
    assert stop in replica.tokenizer.decode(ids) and stop not in replica.tokenizer.decode(ids[:-1])
    assert cut.generation_nll_sum == pytest.approx(_teacher_forced_nll(hf_model, gen_ids, ids), rel=1e-4)


def test_prompt_policies_and_bad_rows(replica):
    long_prompt = "".join(SAMPLE_LINES)
    strict = GenerateParams(greedy=True, max_new_tokens=8, prompt_too_long="error")
    results = generate(replica, [long_prompt, "ok", None, ""], ["a", "b", "c", "d"], strict)
    assert isinstance(results[0], RowError) and results[0].kind == "prompt_too_long"
    assert "max_new_tokens=8" in results[0].message
    assert results[1][0].generated_tokens >= 1
    assert [r.kind for r in results[2:]] == ["null_text", "empty_text"]
    (kept,) = generate(
        replica, [long_prompt], ["a"], strict.model_copy(update={"prompt_too_long": "truncate_left"})
    )
    assert kept[0].prompt_tokens == replica.max_length - 8


@pytest.mark.parametrize(
    "field,value",
    [("top_p", 0.0), ("top_p", 1.5), ("temperature", -0.1), ("top_k", -1), ("max_new_tokens", 0)],
)
def test_invalid_parameters_name_the_parameter(field, value):
    with pytest.raises(ValidationError, match=field):
        GenerateParams(**{field: value})


def test_max_new_tokens_must_leave_room_for_a_prompt(replica):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(replica, ["a"], ["a"], GenerateParams(max_new_tokens=replica.max_length))


def test_draws_follow_transformers_processors_exactly():
    """The share of the uniform's range that maps to each token equals its probability after HF's
    repetition penalty, temperature, top-k and top-p processors (to the grid's resolution)."""
    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 3
    prompt = torch.randint(0, 300, (4, 10))
    seen = torch.zeros(4, 300, dtype=torch.bool).scatter_(1, prompt, True)
    n = 100_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    for params in (GenerateParams(temperature=0.7, top_k=50, top_p=0.8, repetition_penalty=1.2),
                   GenerateParams(temperature=1.3, top_p=0.6, repetition_penalty=1.2),
                   GenerateParams(temperature=0.9, repetition_penalty=1.2)):  # fmt: skip
        ref = RepetitionPenaltyLogitsProcessor(1.2)(prompt, logits.clone())
        warpers = [TemperatureLogitsWarper(params.temperature)]
        warpers += [TopKLogitsWarper(params.top_k)] if params.top_k else []
        warpers += [TopPLogitsWarper(params.top_p)] if params.top_p < 1 else []
        for warper in warpers:
            ref = warper(prompt, ref)
        probs = ref.softmax(-1)
        ours = penalize(logits, seen, 1.2)
        for row in range(4):
            drawn = sample_full(ours[row].expand(n, -1), None, None, params, u=u)
            share = torch.bincount(drawn, minlength=300).double() / n
            assert set(drawn.unique().tolist()) <= set(torch.nonzero(probs[row]).squeeze(1).tolist())
            assert (share - probs[row]).abs().max() < 2e-5


def test_keyed_draws_follow_the_softmax():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log().expand(20_000, 4)
    keys = torch.tensor([sample_key(0, f"id{i}", 0) for i in range(20_000)])
    steps = torch.full((20_000,), 5)
    draws, _ = sampler.sample(logits, keys, steps, GenerateParams())
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert (freq - probs).abs().max() < 0.015  # 20k draws: standard error below 0.004
    assert not torch.equal(draws, sampler.sample(logits, keys, steps + 1, GenerateParams())[0])


def test_ignore_eos_generates_max_new_tokens(replica):
    params = GenerateParams(greedy=True, max_new_tokens=20)
    stopped = [r[0] for r in generate(replica, PROMPTS, IDS, params)]
    assert any(s.finish_reason == "stop" for s in stopped)  # some prompts end with EOS by themselves
    forced = [r[0] for r in generate(replica, PROMPTS, IDS, params.model_copy(update={"ignore_eos": True}))]
    assert all(s.generated_tokens == 20 and s.finish_reason == "length" for s in forced)
