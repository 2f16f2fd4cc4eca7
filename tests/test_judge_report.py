"""Yuyuan-style judgment (against lm-eval's loglikelihood_rolling) and the scoring report (against numbers
recomputed from the output Parquet)."""

from __future__ import annotations

import base64
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from fengshen_batch.io.outputs import sum_counts
from fengshen_batch.job.plan import plan_job
from fengshen_batch.job.run import run_job
from fengshen_batch.kinds.judge import accuracy, label_counts, label_index
from fengshen_batch.kinds.judging import CRITERIA, declarative, judge
from fengshen_batch.reports.generate_sketch import normalize
from fengshen_batch.spec import SpecError, build_spec

TEMPLATES = [
    ("What is aspirin used for?", "fever", "Aspirin is used for fever."),
    ("What are statins used to treat?", "high cholesterol", "Statins are used for high cholesterol."),
    ("What does smoking cause?", "lung cancer", "Smoking causes lung cancer."),
    ("Which drug is used for fever?", "aspirin", "Aspirin is used for fever."),
    ("What is the capital of China?", "Beijing", "The capital of China is Beijing."),
    ("Is insulin a hormone", "yes", "Is insulin a hormone yes."),  # no rule: question + answer
    ("阿司匹林用于治疗什么？", "退烧", "阿司匹林用于退烧。"),
    ("北京位于哪里？", "华北平原", "北京位于华北平原。"),
    ("什么药可以退烧？", "阿司匹林", "阿司匹林可以退烧。"),
    ("糖尿病是什么？", "一种代谢疾病", "糖尿病是一种代谢疾病。"),
]


@pytest.mark.parametrize("question,answer,statement", TEMPLATES)
def test_built_in_templates(question, answer, statement):
    assert declarative(question, answer) == statement


def test_custom_template():
    assert declarative("Q?", "A", "{question} Answer: {answer}") == "Q? Answer: A"
    with pytest.raises(SpecError, match="template must contain"):
        build_spec({"kind": "judge", "model": "m", "input": "i", "output": "o", "answers_column": "a",
                    "template": "{question}"})  # fmt: skip
    with pytest.raises(SpecError, match="exactly one of candidates_column"):
        build_spec({"kind": "judge", "model": "m", "input": "i", "output": "o"})


QUESTIONS = [
    ("What is aspirin used for?", ["fever and pain", "broken bones", "hair growth"], 0),
    ("What does smoking cause?", ["lung cancer", "better sleep"], 0),
    ("Which drug is used for fever?", ["aspirin", "sand"], 0),
    ("北京位于哪里？", ["华北平原", "南极洲", "月球"], 0),
    ("阿司匹林用于治疗什么？", ["退烧和缓解疼痛", "骨折"], 0),
    ("What is the capital of China?", ["Beijing", "Paris"], 0),
]


def _lm_eval_nll(replica, hf_model, statements):
    lm = HFLM(pretrained=hf_model, tokenizer=replica.source, batch_size=1, device="cpu")
    reqs = [Instance("loglikelihood_rolling", {}, (s,), i) for i, s in enumerate(statements)]
    return [-x for x in lm.loglikelihood_rolling(reqs, disable_tqdm=True)]


@pytest.mark.parametrize("criterion", CRITERIA)
def test_choice_is_the_argmin_of_independent_perplexities(replica, hf_model, criterion):
    statement_lists = [[declarative(q, a) for a in answers] for q, answers, _ in QUESTIONS]
    results, _ = judge(replica, statement_lists, criterion)
    for statements, judgment in zip(statement_lists, results, strict=True):
        nll = _lm_eval_nll(replica, hf_model, statements)
        tokens = [len(replica.encode(s)) for s in statements]
        values = {
            "nll": nll,
            "ppl": [math.exp(n / t) for n, t in zip(nll, tokens, strict=True)],
            "bpb": [n / (len(s.encode()) * math.log(2)) for n, s in zip(nll, statements, strict=True)],
        }[criterion]
        assert judgment.choice == int(np.argmin(values))
        assert [s.nll_sum for s in judgment.scores] == pytest.approx(nll, rel=1e-4)
        ordered = sorted(values)
        assert judgment.margin == pytest.approx(ordered[1] - ordered[0], rel=1e-3, abs=1e-9)


def test_single_statement_verdict_needs_a_threshold(replica):
    (no_threshold,), _ = judge(replica, [["Aspirin is used for fever."]], "ppl")
    assert no_threshold.verdict is None and no_threshold.margin is None
    ppl = no_threshold.scores[0].ppl
    (true,), _ = judge(replica, [["Aspirin is used for fever."]], "ppl", threshold=ppl * 1.01)
    (false,), _ = judge(replica, [["Aspirin is used for fever."]], "ppl", threshold=ppl * 0.99)
    assert true.verdict is True and false.verdict is False


def test_accuracy_counts_labels_by_index_or_text():
    rows = [
        {"statements": ["a b", "c"], "candidate_nll_sum": [1.0, 5.0], "candidate_token_count": [2, 1], "label": 0},
        {"statements": ["x", "y y y"], "candidate_nll_sum": [3.0, 6.0], "candidate_token_count": [1, 3],
         "label": "y y y"},
        {"statements": ["p", "q"], "candidate_nll_sum": [1.0, 2.0], "candidate_token_count": [1, 1], "label": None},
    ]  # fmt: skip
    # row 0: nll picks 0, ppl picks 0 (e^0.5 < e^5); row 1: nll picks 0 (3 < 6), ppl picks 1 (e^2 < e^3)
    got = accuracy(label_counts(rows, "label", None), "ppl")
    assert got["labelled_rows"] == 2
    # counted by shard and added up: the same figures
    assert (
        accuracy(sum_counts([label_counts(rows[i : i + 1], "label", None) for i in range(3)]), "ppl") == got
    )
    assert (
        got["per_criterion"]["nll"] == 0.5 and got["per_criterion"]["ppl"] == 1.0 and got["accuracy"] == 1.0
    )


def test_labels_as_pandas_and_people_write_them():
    """Issue 32, case 8: a whole float (pandas' int column with a null), a string of digits, an answer's
    text; labels that name no candidate (out of range, negative, a fraction, a bool, unknown text) are
    counted as invalid, never as wrong answers."""
    statements, answers = ["a b", "c", "d"], ["yes", "no", "0"]
    assert [label_index(x, statements, answers) for x in (1.0, "1", "no", "0", 2, None, float("nan"))] == [
        1, 1, 1, 2, 2, None, None,
    ]  # fmt: skip
    for bad in (3, -1, 1.5, True, "maybe", [0]):
        with pytest.raises(ValueError):
            label_index(bad, statements, answers)
    rows = [{"statements": statements, "candidate_nll_sum": [1.0, 2.0, 3.0], "candidate_token_count": [2, 1, 1],
             "label": label} for label in (0.0, 7, "maybe", None)]  # fmt: skip
    got = accuracy(label_counts(rows, "label", None), "nll")
    assert got["labelled_rows"] == 1 and got["invalid_label_rows"] == 2 and got["accuracy"] == 1.0


@pytest.mark.usefixtures("ray_cluster")
def test_judge_job_with_labels(tmp_path, replica):
    (tmp_path / "in").mkdir()
    table = pa.table({
        "question": [q for q, _, _ in QUESTIONS] + [None],
        "answers": [a for _, a, _ in QUESTIONS] + [["x"]],
        "label": [answers[i] for _, answers, i in QUESTIONS] + ["x"],
    })  # fmt: skip
    pq.write_table(table, tmp_path / "in" / "qa.parquet")
    spec = build_spec({"kind": "judge", "model": replica.source, "input": str(tmp_path / "in"),
                       "output": str(tmp_path / "out"), "answers_column": "answers", "label_column": "label",
                       "shard_rows": 2})  # fmt: skip
    plan = plan_job(spec)
    lines = []
    manifest = run_job(spec, progress=lines.append)
    assert manifest["shards"] > 1  # accuracy is added up from the shards' counts
    assert plan.tokens["tokens"] == manifest["counts"]["tokens"] and plan.tokens["error_rows"] == 1
    # the accuracy on the done line, and a report of its own (the margins chart inside the page)
    acc = manifest["judge"]
    done = next(line for line in lines if line.startswith("done:"))
    assert f"accuracy {acc['accuracy']:.1%} of {acc['labelled_rows']} labelled rows (ppl)" in done
    report = tmp_path / "out" / "report"
    page = (report / "report.html").read_text()
    assert base64.b64encode((report / "margins.png").read_bytes()).decode() in page
    summary = json.loads((report / "summary.json").read_text())
    assert summary["accuracy"] == acc["accuracy"] and summary["rows"] == len(QUESTIONS)
    assert f"Accuracy {acc['accuracy']:.1%}" in page and "<code>null_text</code>" in page
    data = pq.read_table(tmp_path / "out" / "data").to_pylist()
    assert len(data) == len(QUESTIONS) and manifest["counts"]["error_rows"] == 1
    expected, _ = judge(replica, [[declarative(q, a) for a in answers] for q, answers, _ in QUESTIONS], "ppl")
    assert [r["choice"] for r in data] == [e.choice for e in expected]
    correct = sum(r["choice"] == i for r, (_, _, i) in zip(data, QUESTIONS, strict=True))
    assert manifest["judge"]["accuracy"] == pytest.approx(correct / len(QUESTIONS))
    assert manifest["judge"]["labelled_rows"] == len(QUESTIONS)
    print(f"judge accuracy (tiny random model, {len(QUESTIONS)} labelled questions): {manifest['judge']}")


@pytest.mark.usefixtures("ray_cluster")
def test_score_report_matches_the_output(tmp_path, replica):
    from tests.helpers import write_texts

    write_texts(tmp_path / "in", files=(20, 15), repeat_every=4)
    spec = build_spec({"kind": "score", "model": replica.source, "input": str(tmp_path / "in"),
                       "output": str(tmp_path / "out"), "report_by": "source", "bucket_quantiles": [0.3, 0.7]})  # fmt: skip
    manifest = run_job(spec, progress=lambda _: None)
    report = tmp_path / "out" / "report"
    summary = json.loads((report / "summary.json").read_text())
    data = pq.read_table(tmp_path / "out" / "data")
    nll, tokens, ppl = (data.column(c).to_numpy() for c in ("nll_sum", "token_count", "ppl"))
    assert summary["rows"] == 35 and summary["tokens"] == tokens.sum() == manifest["counts"]["tokens"]
    assert summary["corpus_ppl"] == pytest.approx(math.exp(nll.sum() / tokens.sum()))
    # quantiles from the shards' merged log-histograms: within half a bin (0.6%) of the exact ones
    assert summary["ppl_quantiles"]["p50"] == pytest.approx(np.quantile(ppl, 0.5), rel=6e-3)
    bpb = data.column("bits_per_byte").to_numpy()
    assert summary["bits_per_byte_quantiles"]["p90"] == pytest.approx(np.quantile(bpb, 0.9), rel=6e-3)
    for source in ("file0", "file1"):
        part = data.filter(pa.compute.equal(data.column("source"), source))
        assert summary["groups"][source]["rows"] == part.num_rows
    # CCNet-style buckets at the 30% and 70% quantiles of perplexity
    cutoffs = manifest["bucket_cutoffs"]
    assert cutoffs == pytest.approx([np.quantile(ppl, 0.3), np.quantile(ppl, 0.7)], rel=6e-3)
    for row in data.to_pylist():
        expected = "head" if row["ppl"] <= cutoffs[0] else "middle" if row["ppl"] <= cutoffs[1] else "tail"
        assert row["bucket"] == expected
    assert summary["buckets"] == {
        b: [r["bucket"] for r in data.to_pylist()].count(b) for b in ("head", "middle", "tail")
    }
    assert sum(summary["buckets"].values()) == 35
    png = (report / "ppl_histogram.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    page = (report / "report.html").read_text()
    lowest = data.sort_by("ppl").column("id")[0].as_py()
    assert base64.b64encode(png).decode() in page and lowest in page  # the chart travels inside the page
    # each text once in the example lists; the duplicate rate is exact at this size
    texts = {normalize(t) for t in data.column("text").to_pylist()}
    assert summary["duplicate_rate"] == pytest.approx(1 - len(texts) / 35) and summary["duplicate_rate"] > 0
    assert summary["duplicate_rate_exact"] and f"{summary['duplicate_rate']:.2%}" in page
    assert page.count("<tr>") >= 2 * min(20, len(texts))

    # `fengshen-batch report` rebuilds it from the output alone
    shutil.rmtree(report)
    from click.testing import CliRunner

    from fengshen_batch.cli import main

    res = CliRunner().invoke(main, ["report", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert json.loads((report / "summary.json").read_text()) == summary
    # ... and for another column, from the data files (read in parallel), the groups' rows adding up
    res = CliRunner().invoke(main, ["report", str(tmp_path / "out"), "--by", "bucket"])
    assert res.exit_code == 0, res.output
    rebuilt = json.loads((report / "summary.json").read_text())
    assert {g: f["rows"] for g, f in rebuilt["groups"].items()} == summary["buckets"]

    # fixed thresholds: the bucket is written with each shard, no rewrite afterwards
    spec = build_spec({**spec.model_dump(), "output": str(tmp_path / "fixed"), "bucket_quantiles": None,
                       "bucket_thresholds": [cutoffs[0], cutoffs[1]]})  # fmt: skip
    manifest = run_job(spec, progress=lambda _: None)
    fixed = pq.read_table(tmp_path / "fixed" / "data")
    assert manifest["bucket_cutoffs"] == cutoffs
    assert fixed.column("bucket").to_pylist() == data.column("bucket").to_pylist()


@pytest.mark.skipif(
    not shutil.which("chromium"), reason="Chromium is not installed (Debian package chromium)"
)
def test_report_html_opens_in_headless_chromium(tmp_path, replica):
    from fengshen_batch.io.outputs import OutputStore
    from fengshen_batch.io.storage import StorageSpec
    from fengshen_batch.reports.score_report import build_report

    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["<b>x</b>", "北京"], "nll_sum": [3.0, 9.0],
                             "token_count": [2, 3], "ppl": [4.48, 20.1], "byte_count": [8, 6],
                             "bits_per_byte": [0.54, 2.16]}), out / "data" / "part-000000.parquet")  # fmt: skip
    build_report(OutputStore(str(out), StorageSpec()), {"model": "m", "spec": {"text_column": "text"}})
    # the page alone, as mailed or fetched as one object: its chart must still show
    (tmp_path / "alone").mkdir()
    page = shutil.copy(out / "report" / "report.html", tmp_path / "alone" / "report.html")
    shot = tmp_path / "shot.png"
    from PIL import Image

    from tests.helpers import screenshot

    res = screenshot(Path(page), shot, tmp_path / "profile", "1100,900")
    assert res.returncode == 0, res.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 10_000
    pixels = Image.open(shot).convert("RGB").getdata()
    bars = sum(
        abs(r - 0x3B) + abs(g - 0x6E) + abs(b - 0xA5) < 40 for r, g, b in pixels
    )  # the histogram's blue
    assert bars > 300, bars
    assert "&lt;b&gt;x&lt;/b&gt;" in (out / "report" / "report.html").read_text()  # text is escaped


@pytest.mark.usefixtures("ray_cluster")
def test_a_resumed_score_job_reports_from_old_and_new_shards_alike(tmp_path, replica):
    from tests.helpers import write_texts

    write_texts(tmp_path / "in", files=(12, 9), repeat_every=3)
    fields = {"kind": "score", "model": replica.source, "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
              "shard_rows": 5, "report_by": "source", "bucket_quantiles": [0.4, 0.8]}  # fmt: skip
    first = run_job(build_spec(fields), progress=lambda _: None)
    summary = json.loads((tmp_path / "out" / "report" / "summary.json").read_text())
    # an interrupted run: two shards uncommitted, no report, no _SUCCESS; the rerun merges the summaries of
    # the shards it finds committed with those of the shards it redoes
    for name in ("part-000001.json", "part-000003.json"):
        (tmp_path / "out" / "_markers" / name).unlink()
    for name in ("_SUCCESS", "manifest.json"):
        (tmp_path / "out" / name).unlink()
    shutil.rmtree(tmp_path / "out" / "report")
    again = run_job(build_spec(fields), progress=lambda _: None)
    assert again["resumed_shards"] == first["shards"] - 2
    assert again["bucket_cutoffs"] == first["bucket_cutoffs"]
    assert json.loads((tmp_path / "out" / "report" / "summary.json").read_text()) == summary
