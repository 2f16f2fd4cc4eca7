"""Perplexity: equal to lm-evaluation-harness `loglikelihood_rolling`, and independent of batching."""

from __future__ import annotations

import math
import random

import pytest
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from fengshen_batch.kinds import scoring
from fengshen_batch.kinds.batching import run_packed
from fengshen_batch.kinds.rows import RowError, ScoreResult
from fengshen_batch.kinds.scoring import rolling_windows, score_texts
from fengshen_batch.params import ScoreParams
from fengshen_batch.tiny_model import SAMPLE_LINES

TEXTS = [
    *SAMPLE_LINES,
    "北",
    " ".join(SAMPLE_LINES[:6]),  # a few windows
    "".join(SAMPLE_LINES) * 2,  # many windows (about 700 tokens at a 64-token context)
    "before<|endoftext|>after: a real EOS inside the text",
    "  leading and trailing spaces  ",
]


@pytest.fixture(scope="module")
def lm_eval_reference(replica, hf_model, tiny_model_dir):
    """lm-eval's own numbers, one request at a time (batch_size=1: no padding in the reference), with HF's
    model and HF's tokenizer (lm-eval loads it from the model dir)."""
    lm = HFLM(pretrained=hf_model, tokenizer=str(tiny_model_dir), batch_size=1, device="cpu")
    assert lm.max_length == replica.max_length
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(TEXTS)]
    return lm.loglikelihood_rolling(reqs, disable_tqdm=True)


def test_perplexity_equals_lm_eval_loglikelihood_rolling(replica, lm_eval_reference):
    results, _ = score_texts(replica, TEXTS, token_budget=512)
    worst = 0.0
    for text, res, ref_ll in zip(TEXTS, results, lm_eval_reference, strict=True):
        assert isinstance(res, ScoreResult)
        worst = max(worst, abs(-res.nll_sum - ref_ll) / abs(ref_ll))
        # token count: what lm-eval's windows predict, counted by lm-eval's own window code
        tokens = replica.tokenizer.encode(text, add_special_tokens=False)
        windows = lm_utils.get_rolling_token_windows(tokens, replica.eos_id, replica.max_length, 1)
        assert res.token_count == sum(len(pred) for _, pred in windows)
    print(f"worst relative error against lm-eval loglikelihood_rolling: {worst:.3e}")
    assert worst < 1e-4
    assert max(r.token_count for r in results) > 10 * replica.max_length  # several windows exercised


def test_derived_figures(replica):
    (res,), _ = score_texts(replica, ["阿司匹林常用于退烧。"])
    assert res.byte_count == len("阿司匹林常用于退烧。".encode())
    assert res.ppl == pytest.approx(math.exp(res.nll_sum / res.token_count))
    assert res.bits_per_byte == pytest.approx(res.nll_sum / (res.byte_count * math.log(2)))


@pytest.mark.parametrize("stride", [1, 7, 32, 63, 64])
def test_stride_windows_are_lm_eval_windows(stride):
    """stride = lm-eval's pred_len; lm-eval spells it context_len = max_len - stride + 1."""
    tokens = list(range(100, 100 + 300))
    max_len = 64
    ours = rolling_windows(tokens, 0, max_len, stride)
    theirs = [
        lm_utils.make_disjoint_window(w)
        for w in lm_utils.get_rolling_token_windows(tokens, 0, max_len, max_len - stride + 1)
    ]
    assert len(ours) == len(theirs)
    for (seq, n_scored), (context, cont) in zip(ours, theirs, strict=True):
        full = context + cont  # what lm-eval feeds: (context + continuation)[-(max_len + 1):][:-1]
        assert seq == full[-(max_len + 1) :]
        assert n_scored == len(cont)
    assert sum(n for _, n in ours) == len(tokens)  # every token scored exactly once


def _unbatched_nll(replica, hf_model, text, stride):
    """Reference: one window at a time, full logits, no batching, no chunking."""
    tokens = replica.encode(text)
    total = 0.0
    for seq, n_scored in rolling_windows(tokens, replica.eos_id, replica.max_length, stride):
        with torch.no_grad():
            logits = hf_model(torch.tensor([seq[:-1]])).logits[0].float()
        logprobs = logits.log_softmax(-1)[-n_scored:]
        total -= logprobs.gather(1, torch.tensor(seq[-n_scored:])[:, None]).sum().item()
    return total


def test_stride_scoring_equals_unbatched_reference(replica, hf_model):
    text = "".join(SAMPLE_LINES)
    for stride in (16, 48):
        (res,), _ = score_texts(replica, [text], ScoreParams(stride=stride), token_budget=300)
        assert res.nll_sum == pytest.approx(_unbatched_nll(replica, hf_model, text, stride), rel=1e-5)
        assert res.token_count == len(replica.encode(text))


@pytest.mark.parametrize("budget", [1, 64, 200, 1000, 100_000])
def test_batched_equals_one_at_a_time(replica, budget):
    singles = [score_texts(replica, [t])[0][0] for t in TEXTS]
    order = list(range(len(TEXTS)))
    random.Random(budget).shuffle(order)
    batched, _ = score_texts(replica, [TEXTS[i] for i in order], token_budget=budget)
    for pos, i in enumerate(order):
        assert batched[pos].token_count == singles[i].token_count
        assert batched[pos].nll_sum == pytest.approx(singles[i].nll_sum, rel=1e-5)


def test_bad_rows_are_row_errors_and_the_rest_is_scored(replica):
    results, _ = score_texts(replica, ["fine text", None, "", 42, "also fine"])
    assert [type(r) for r in results] == [ScoreResult, RowError, RowError, RowError, ScoreResult]
    assert [r.kind for r in results if isinstance(r, RowError)] == ["null_text", "empty_text", "not_a_string"]


def test_out_of_memory_halves_the_budget_and_retries(replica, monkeypatch):
    """A fake OOM for batches over 150 padded tokens: same numbers, smaller final budget."""
    real = scoring.window_logprobs
    calls = []

    def flaky(rep, windows, per_token=False):
        cost = len(windows) * max(len(s) - 1 for s, _ in windows)
        calls.append(cost)
        if cost > 150:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(rep, windows, per_token)

    expected, _ = score_texts(replica, TEXTS, token_budget=10_000)
    monkeypatch.setattr(scoring, "window_logprobs", flaky)
    got, budget = score_texts(replica, TEXTS, token_budget=10_000)
    # halved until a batch of 64-token windows fits under 150 tokens: 2 rows (128), budget 10000 / 2**6
    assert budget == 10_000 // 2**6
    assert any(c > 150 for c in calls)
    for a, b in zip(expected, got, strict=True):
        assert b.nll_sum == pytest.approx(a.nll_sum, rel=1e-5)


def test_run_packed_returns_every_item_once_in_order():
    lengths = [5, 1, 9, 3, 3, 7, 2]
    seen_batches = []

    def process(idx):
        seen_batches.append(list(idx))
        return [i * 10 for i in idx]

    results, _ = run_packed(lengths, 10, process)
    assert results == [i * 10 for i in range(len(lengths))]
    for batch in seen_batches:  # within budget, except a single item wider than it
        assert len(batch) * max(lengths[i] for i in batch) <= 10 or len(batch) == 1
    with pytest.raises(RuntimeError, match="exactly once|returned"):
        run_packed(lengths, 10, lambda idx: [0] * (len(idx) - 1))


def test_chunked_lm_head_equals_one_chunk(replica, monkeypatch):
    """Log-probs computed a few rows of logits at a time equal those of a single chunk."""
    whole, _ = score_texts(replica, TEXTS, token_budget=4096)
    monkeypatch.setattr(scoring, "LOGIT_CHUNK_ROWS", 7)
    chunked, _ = score_texts(replica, TEXTS, token_budget=4096)
    for a, b in zip(whole, chunked, strict=True):
        assert b.nll_sum == pytest.approx(a.nll_sum, rel=1e-6)
