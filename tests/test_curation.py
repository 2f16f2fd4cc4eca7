"""Curation features: a reference model (Moore-Lewis bpb_diff), token logprobs, prompt templates, best-of-n."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from lm_eval import utils as lm_utils

from fengshen_batch.cli import main
from fengshen_batch.engine.gpt2 import GPT2
from fengshen_batch.errors import JobError
from fengshen_batch.job.run import run_job
from fengshen_batch.kinds.generation import generate, keep_best
from fengshen_batch.kinds.scoring import score_texts
from fengshen_batch.params import GenerateParams
from fengshen_batch.spec import build_spec
from fengshen_batch.tiny_model import SAMPLE_LINES, build_tiny_gpt2
from tests.helpers import write_texts

LONG = "".join(SAMPLE_LINES) * 2  # many windows at the 64-token context


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """Another tiny GPT2 with its own tokenizer (a smaller vocabulary) and context: bits per byte is the
    fair unit between the two."""
    return build_tiny_gpt2(tmp_path_factory.mktemp("ref-gpt2"), n_positions=48, vocab_size=300, seed=1)


def _sorted(path) -> list[dict]:
    return sorted(pq.read_table(path).to_pylist(), key=lambda r: r["id"])


# ------------------------------------------------------------------------------------------ token logprobs


@pytest.fixture(scope="module")
def float64_pair(replica, hf_model):
    """Our replica and HF's model over the same weights in float64. What the windows test compares is which
    token each window predicts from which context; in float32 the two forwards' rounding differs by CPU (a
    CI machine put one of 35 log-probs 1.4e-4 apart, this one 1.4e-6), which would hide or fake that."""
    hf64 = copy.deepcopy(hf_model).double()
    return dataclasses.replace(replica, model=GPT2.from_hf(hf64), dtype=torch.float64), hf64


def test_score_token_logprobs_equal_hf_on_lm_evals_windows(float64_pair):
    replica, hf_model = float64_pair
    texts = [SAMPLE_LINES[0], LONG]
    results, _ = score_texts(replica, texts, token_budget=512, token_logprobs=True)
    for text, res in zip(texts, results, strict=True):
        tokens = replica.tokenizer.encode(text, add_special_tokens=False)
        assert res.token_ids == tokens and len(res.token_logprobs) == res.token_count == len(tokens)
        assert math.fsum(res.token_logprobs) == pytest.approx(-res.nll_sum, rel=1e-9)
        # independent: HF's model on lm-eval's own disjoint rolling windows, each token predicted once
        expected = []
        windows = lm_utils.get_rolling_token_windows(tokens, replica.eos_id, replica.max_length, 1)
        for context, pred in map(lm_utils.make_disjoint_window, windows):
            ids = torch.tensor([context + pred])[:, :-1]
            logprobs = hf_model(ids).logits.log_softmax(-1)[0, -len(pred) :]
            expected += logprobs.gather(1, torch.tensor(pred)[:, None]).squeeze(1).tolist()
        # the LM head runs in float32 (GPT2.logits): its rounding, not the windows, bounds the difference
        assert res.token_logprobs == pytest.approx(expected, abs=1e-5)
    assert len(results[1].token_logprobs) > 5 * replica.max_length  # several windows


def test_generation_token_logprobs_equal_hf_forward(replica, hf_model):
    params = GenerateParams(max_new_tokens=12, greedy=True, stop=("北",))
    prompts = [SAMPLE_LINES[1], SAMPLE_LINES[3][:20]]
    for prompt, samples in zip(prompts, generate(replica, prompts, ["a", "b"], params), strict=True):
        (s,) = samples
        assert len(s.token_ids) == len(s.token_logprobs) == s.generated_tokens
        assert math.fsum(s.token_logprobs) == pytest.approx(-s.generation_nll_sum, rel=1e-6)
        ids = replica.tokenizer.encode(prompt, add_special_tokens=False)
        full = torch.tensor([ids + s.token_ids])
        logprobs = hf_model(full).logits.log_softmax(-1)[0, len(ids) - 1 : -1]
        expected = logprobs.gather(1, torch.tensor(s.token_ids)[:, None]).squeeze(1).tolist()
        assert s.token_logprobs == pytest.approx(expected, abs=1e-4)


# ------------------------------------------------------------------------------------------- best of n


def test_keep_best_keeps_the_lowest_nll_per_token():
    from fengshen_batch.kinds.rows import Sample

    samples = [
        Sample(i, "x", 3, n, "length", nll)
        for i, (n, nll) in enumerate([(2, 4.0), (4, 4.0), (1, 1.0), (4, 4.0)])
    ]
    # per token: 2.0, 1.0, 1.0, 1.0 -> the three 1.0s tie, broken by sample index: 1 and 2
    assert [s.sample_index for s in keep_best(samples, 2)] == [1, 2]


@pytest.mark.usefixtures("ray_cluster")
def test_keep_best_job_keeps_the_k_best_of_the_full_n(tmp_path, replica):
    rows = write_texts(tmp_path / "in", files=(5, 4))
    base = {"kind": "generate", "model": str(replica.source), "input": str(tmp_path / "in"), "prompt_column": "text",
            "max_new_tokens": 8, "num_return_sequences": 4, "seed": 3, "temperature": 1.0, "shard_rows": 3}  # fmt: skip
    run_job(build_spec({**base, "output": str(tmp_path / "all")}), progress=lambda _: None)
    manifest = run_job(
        build_spec({**base, "output": str(tmp_path / "best"), "keep_best": 2}), progress=lambda _: None
    )
    full, best = _sorted(tmp_path / "all" / "data"), _sorted(tmp_path / "best" / "data")
    assert manifest["counts"]["result_rows"] == 2 * len(rows) and manifest["counts"][
        "dropped_samples"
    ] == 2 * len(rows)
    for row_id in rows:
        samples = sorted((r for r in full if r["id"] == row_id), key=lambda r: r["sample_index"])
        ranked = sorted(
            samples, key=lambda r: (r["generation_nll_sum"] / r["generated_tokens"], r["sample_index"])
        )
        kept = sorted(r["sample_index"] for r in ranked[:2])
        got = sorted((r for r in best if r["id"] == row_id), key=lambda r: r["sample_index"])
        assert [r["sample_index"] for r in got] == kept
        assert [r["generation"] for r in got] == [samples[i]["generation"] for i in kept]


# ------------------------------------------------------------------------------------------- templates


@pytest.mark.usefixtures("ray_cluster")
def test_prompt_template_fills_prompts_from_columns(tmp_path, replica):
    (tmp_path / "in").mkdir()
    table = pa.table({"topic": ["aspirin", "北京", None, "fever"], "style": ["short", "formal", "plain", None],
                      "n": [1, 2, 3, 4]})  # fmt: skip
    pq.write_table(table, tmp_path / "in" / "t.parquet")
    template = "Write a {style} note {{#{n}}} about {topic}:"
    spec = build_spec({"kind": "generate", "model": str(replica.source), "input": str(tmp_path / "in"),
                       "output": str(tmp_path / "out"), "prompt_template": template, "max_new_tokens": 5,
                       "greedy": True, "token_logprobs": True})  # fmt: skip
    manifest = run_job(spec, progress=lambda _: None)
    assert manifest["counts"]["error_rows"] == 2
    data = _sorted(tmp_path / "out" / "data")
    good = [r for r in table.to_pylist() if r["topic"] is not None and r["style"] is not None]
    assert [d["prompt"] for d in data] == [template.format(**r) for r in good]
    expected = generate(replica, [d["prompt"] for d in data], [d["id"] for d in data], spec.params())
    assert [d["generation"] for d in data] == [e[0].generation for e in expected]
    for d in data:
        assert math.fsum(d["token_logprobs"]) == pytest.approx(-d["generation_nll_sum"], rel=1e-4)
    errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert {e["error_kind"] for e in errors} == {"null_template_field"}
    assert sorted(e["error_message"] for e in errors) == [
        "template column 'style' is null in this row",
        "template column 'topic' is null in this row",
    ]

    # keep_prompt: false leaves the prompt out; these settings are result-relevant (the spec hash)
    quiet = build_spec({**spec.model_dump(mode="json"), "output": str(tmp_path / "q"), "keep_prompt": False})
    run_job(quiet, progress=lambda _: None)
    assert "prompt" not in pq.read_schema(next((tmp_path / "q" / "data").iterdir()))
    other = build_spec({**spec.model_dump(mode="json"), "keep_prompt": False})
    with pytest.raises(JobError, match="different configuration"):
        run_job(other, progress=lambda _: None)


def test_template_column_missing_fails_before_ray_starts(tmp_path, replica):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"topic": ["a"]}), tmp_path / "in" / "t.parquet")
    result = CliRunner().invoke(main, [
        "generate", "--model", str(replica.source), "--input", str(tmp_path / "in"), "--output",
        str(tmp_path / "out"), "--prompt-template", "About {topic} in {style}:",
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "style" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_an_input_column_named_like_a_result_is_refused(tmp_path, replica):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": ["a b c"], "ppl": [3.0]}), tmp_path / "in" / "t.parquet")
    spec = build_spec({"kind": "score", "model": str(replica.source), "input": str(tmp_path / "in"),
                       "output": str(tmp_path / "out")})  # fmt: skip
    with pytest.raises(JobError, match="a column ppl, which this job writes"):
        run_job(spec, progress=lambda _: None)


# ---------------------------------------------------------------------------------------- reference model


@pytest.mark.usefixtures("ray_cluster")
def test_reference_columns_equal_a_separate_job_with_the_reference(tmp_path, replica, reference_dir):
    write_texts(tmp_path / "in")
    base = {"kind": "score", "input": str(tmp_path / "in"), "shard_rows": 8, "dtype": "float32"}
    manifest = run_job(build_spec({**base, "model": str(replica.source), "output": str(tmp_path / "both"),
                                   "reference_model": str(reference_dir), "bucket_by": "bpb_diff",
                                   "bucket_quantiles": [0.25, 0.75], "token_logprobs": True}),
                       progress=lambda _: None)  # fmt: skip
    run_job(
        build_spec({**base, "model": str(reference_dir), "output": str(tmp_path / "ref")}),
        progress=lambda _: None,
    )
    run_job(
        build_spec({**base, "model": str(replica.source), "output": str(tmp_path / "main")}),
        progress=lambda _: None,
    )
    both, ref, alone = (_sorted(tmp_path / d / "data") for d in ("both", "ref", "main"))
    assert len(both) == len(ref) == len(alone) == manifest["counts"]["input_rows"]
    for b, r, a in zip(both, ref, alone, strict=True):
        assert (b["ref_nll_sum"], b["ref_token_count"], b["ref_ppl"], b["ref_bits_per_byte"]) == (
            r["nll_sum"], r["token_count"], r["ppl"], r["bits_per_byte"])  # fmt: skip
        assert (b["nll_sum"], b["bits_per_byte"]) == (a["nll_sum"], a["bits_per_byte"])
        assert b["bpb_diff"] == b["bits_per_byte"] - r["bits_per_byte"]
        assert len(b["token_logprobs"]) == b["token_count"]  # the target model's tokens
    assert {b["token_count"] for b in both} != {b["ref_token_count"] for b in both}  # two tokenizers
    # buckets cut bpb_diff at its quartiles (read from the shards' linear histograms: within 0.0005)
    low, high = manifest["bucket_cutoffs"]
    for b in both:
        expect = "head" if b["bpb_diff"] <= low else "middle" if b["bpb_diff"] <= high else "tail"
        assert b["bucket"] == expect
    diffs = sorted(b["bpb_diff"] for b in both)
    import numpy as np

    assert low == pytest.approx(float(np.quantile(diffs, 0.25)), abs=6e-4)
    summary = json.loads((tmp_path / "both" / "report" / "summary.json").read_text())
    assert summary["bpb_diff_quantiles"]["p50"] == pytest.approx(float(np.quantile(diffs, 0.5)), abs=6e-4)
    assert "bpb_diff p50" in (tmp_path / "both" / "report" / "report.html").read_text()
