"""Nightly scoring against a baseline: the comparison equals what the two outputs' rows give, a baseline of
another model or stride is refused, and drift turns the exit code, not a rerun of the same corpus."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from fengshen_batch import JobError
from fengshen_batch.cli import main
from fengshen_batch.job.run import run_job
from fengshen_batch.reports.baseline import DRIFT_EXIT_CODE, drift, ks_distance
from fengshen_batch.reports.histograms import BINS_PER_DECADE, histogram
from fengshen_batch.spec import build_spec, load_spec
from fengshen_batch.tiny_model import build_tiny_gpt2
from tests.helpers import write_texts

BOILERPLATE = "Accept cookies to continue. Subscribe to our newsletter! Click here. "


def exact_ks(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic, sup |F_a - F_b| over every value."""
    x = np.concatenate([a, b])
    fa = np.searchsorted(np.sort(a), x, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), x, side="right") / len(b)
    return float(np.abs(fa - fb).max())


@pytest.mark.parametrize("shift", [1.0, 1.03, 1.5])
def test_binned_ks_brackets_the_exact_statistic(shift):
    rng = np.random.default_rng(7)
    a = np.exp(rng.normal(3.0, 0.6, 3000))
    b = np.exp(rng.normal(3.0, 0.7, 2000)) * shift
    got = ks_distance(histogram(a), histogram(b))
    exact = exact_ks(a, b)
    assert got["ks"] <= exact + 1e-12 <= got["ks"] + got["ks_bound"] + 1e-12
    assert got["ks_bound"] < 0.02  # 200 bins per decade: a bin holds a small share of either side


def _score(model, inp, out, **extra) -> dict:
    fields = {"kind": "score", "model": model, "input": str(inp), "output": str(out), "report_by": "source",
              "shard_rows": 9, **extra}  # fmt: skip
    return run_job(build_spec(fields), progress=lambda _: None)


def _rows(out) -> pa.Table:
    return pq.read_table(out / "data")


def _corpus_ppl(table: pa.Table) -> float:
    return math.exp(pc.sum(table.column("nll_sum")).as_py() / pc.sum(table.column("token_count")).as_py())


def _drifted_copy(src, dst):
    """The same corpus, but source file1 pulling boilerplate into every text."""
    shutil.copytree(src, dst)
    path = dst / "part-1.parquet"
    table = pq.read_table(path)
    texts = [BOILERPLATE * 2 + t[:8] for t in table.column("text").to_pylist()]
    pq.write_table(table.set_column(0, "text", pa.array(texts)), path)


@pytest.mark.usefixtures("ray_cluster")
def test_bpb_change_alerts_on_a_source_turned_to_noise_that_perplexity_misses(tmp_path, replica):
    """A source whose texts became noise (random CJK characters in a corpus of Chinese and English lines):
    the tiny random model's perplexity per token hardly moves, its bits per byte do; `bpb_change` alerts
    on that group and on the corpus, through the CLI's report command over the two outputs."""
    import random

    write_texts(tmp_path / "in", files=(14, 13, 13), repeat_every=3)
    before, after = tmp_path / "2026-11-27", tmp_path / "2026-11-28"
    _score(replica.source, tmp_path / "in", before)
    shutil.copytree(tmp_path / "in", tmp_path / "noisy")
    path = tmp_path / "noisy" / "part-1.parquet"
    table, rng = pq.read_table(path), random.Random(0)
    # characters drawn from all of CJK: each is 3 byte-level tokens to a tokenizer that never saw it
    noise = ["".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in t) for t in table.column("text").to_pylist()]
    pq.write_table(table.set_column(0, "text", pa.array(noise)), path)
    _score(replica.source, tmp_path / "noisy", after)

    res = CliRunner().invoke(main, ["report", str(after), "--by", "source", "--baseline", str(before),
                                    "--drift-threshold", "bpb_change=0.05,min_group_rows=5"])  # fmt: skip
    assert res.exit_code == DRIFT_EXIT_CODE, res.output
    comparison = json.loads((after / "report" / "summary.json").read_text())["comparison"]
    group = next(g for g in comparison["groups"] if g["group"] == "file1")
    bpb, ppl = group["corpus_bits_per_byte"]["change"], group["corpus_ppl"]["change"]
    assert abs(bpb) > 0.05 and abs(bpb) > 3 * abs(ppl)  # bits per byte moved; perplexity, much less
    breaches = json.loads((after / "report" / "summary.json").read_text())["drift"]["breaches"]
    assert f"source file1: bits per byte {bpb:+.1%} (limit ±5.0%)" in breaches
    assert not any("file0" in b or "file2" in b for b in breaches)
    # the same night under a perplexity limit as tight: perplexity stays within it where bpb did not
    res = CliRunner().invoke(main, ["report", str(after), "--by", "source", "--baseline", str(before),
                                    "--drift-threshold", f"ppl_change={abs(bpb) / 3:.4f},min_group_rows=5"])  # fmt: skip
    assert res.exit_code == 0, res.output


@pytest.mark.usefixtures("ray_cluster")
def test_comparison_equals_the_rows_and_drift_sets_the_exit_code(tmp_path, replica):
    write_texts(tmp_path / "in", files=(14, 13, 13), repeat_every=3)
    day1, day2, day3 = (tmp_path / d for d in ("2026-11-27", "2026-11-28", "2026-11-29"))
    base = _score(replica.source, tmp_path / "in", day1, bucket_quantiles=[0.3, 0.7])
    assert base["model_fingerprint"]["tokenizer"] and (day1 / "report" / "sketch.json").exists()
    threshold = {
        "ppl_change": 0.05,
        "bpb_change": None,
        "ks": 0.3,
        "volume_change": None,
        "min_group_rows": 5,
    }

    # the same corpus again: nothing moved, no alert, exit 0
    res = CliRunner().invoke(main, [
        "score", "--model", str(replica.source), "--input", str(tmp_path / "in"), "--output", str(day2),
        "--report-by", "source", "--shard-rows", "9", "--baseline", str(day1),
        "--drift-threshold", "ppl_change=0.05,ks=0.3,min_group_rows=5",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    manifest = json.loads((day2 / "manifest.json").read_text())
    assert manifest["drift"] == {"threshold": threshold, "exceeded": False, "breaches": []}
    # a passing comparison is one line in the terminal, the night's volume beside its perplexity
    assert (f"baseline {day1}: corpus ppl +0.0%, bits per byte +0.0%, KS 0.000, rows +0.0%, tokens +0.0%; "
            "within the drift threshold") in res.output.splitlines()  # fmt: skip
    same = json.loads((day2 / "report" / "summary.json").read_text())["comparison"]
    assert same["corpus_ppl"]["change"] == 0 and same["ks"] == 0 and not same["new_groups"]
    # today's documents in the baseline's buckets: its 30/40/30 split, to within the cutoff bins' documents
    hist = json.loads((day2 / "report" / "sketch.json").read_text())["ppl"]
    edge_docs = sum(
        hist["bins"].get(str(math.floor(math.log10(c) * BINS_PER_DECADE)), 0) for c in base["bucket_cutoffs"]
    )
    buckets = same["baseline_buckets"]
    for k in ("head", "middle", "tail"):
        assert abs(buckets["today"][k] - buckets["baseline"][k]) <= edge_docs / 40 + 1e-12

    # boilerplate in one source: the job completes (_SUCCESS) and exits 3 with manifest.drift.exceeded
    _drifted_copy(tmp_path / "in", tmp_path / "drifted")
    res = CliRunner().invoke(main, [
        "score", "--model", str(replica.source), "--input", str(tmp_path / "drifted"), "--output", str(day3),
        "--report-by", "source", "--shard-rows", "9", "--baseline", str(day1),
        "--drift-threshold", "ppl_change=0.05,ks=0.3,min_group_rows=5",
    ])  # fmt: skip
    assert res.exit_code == DRIFT_EXIT_CODE, res.output
    assert (day3 / "_SUCCESS").exists()
    manifest = json.loads((day3 / "manifest.json").read_text())
    assert manifest["drift"]["exceeded"] and any("source file1" in b for b in manifest["drift"]["breaches"])
    assert not any("source file0" in b or "source file2" in b for b in manifest["drift"]["breaches"])
    # a retry of the drifted night finds it complete and stays red
    res = CliRunner().invoke(main, ["score", "--model", str(replica.source), "--input", str(tmp_path / "drifted"),
                                    "--output", str(day3), "--report-by", "source", "--shard-rows", "9",
                                    "--baseline", str(day1), "--drift-threshold", "ppl_change=0.05,ks=0.3,min_group_rows=5"])  # fmt: skip
    assert res.exit_code == DRIFT_EXIT_CODE, res.output

    # every figure against the two outputs' rows
    comparison = json.loads((day3 / "report" / "summary.json").read_text())["comparison"]
    today, before = _rows(day3), _rows(day1)
    assert comparison["corpus_ppl"]["today"] == pytest.approx(_corpus_ppl(today), rel=1e-9)
    assert comparison["corpus_ppl"]["baseline"] == pytest.approx(_corpus_ppl(before), rel=1e-9)
    assert comparison["corpus_ppl"]["change"] == pytest.approx(
        _corpus_ppl(today) / _corpus_ppl(before) - 1, rel=1e-9
    )
    bpb = [
        pc.sum(t.column("nll_sum")).as_py() / math.log(2) / pc.sum(t.column("byte_count")).as_py()
        for t in (today, before)
    ]
    assert comparison["corpus_bits_per_byte"]["today"] == pytest.approx(bpb[0], rel=1e-9)
    assert comparison["corpus_bits_per_byte"]["baseline"] == pytest.approx(bpb[1], rel=1e-9)
    tokens = [pc.sum(t.column("token_count")).as_py() for t in (today, before)]
    assert comparison["tokens"] == {
        "today": tokens[0],
        "baseline": tokens[1],
        "change": tokens[0] / tokens[1] - 1,
    }
    assert comparison["rows_change"] == 0
    volume = drift(comparison, {"volume_change": 0.01, "min_group_rows": 5})  # the boilerplate added tokens
    assert f"corpus: tokens {tokens[0] / tokens[1] - 1:+.1%} (limit ±1.0%)" in volume["breaches"]
    assert not any("rows" in b for b in volume["breaches"])
    for key, q in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9)):  # within half a bin on each side
        want = (
            np.quantile(today.column("ppl").to_numpy(), q) / np.quantile(before.column("ppl").to_numpy(), q)
            - 1
        )
        assert comparison["ppl_quantiles"][key]["change"] == pytest.approx(want, abs=0.013)
    ppl = today.column("ppl").to_numpy(), before.column("ppl").to_numpy()
    exact = exact_ks(*ppl)
    assert comparison["ks"] <= exact + 1e-12 <= comparison["ks"] + comparison["ks_bound"] + 1e-12
    groups = {g["group"]: g for g in comparison["groups"]}
    assert comparison["groups"][0]["group"] == "file1"  # largest change first
    for name, g in groups.items():
        mine = today.filter(pc.equal(today.column("source"), name))
        theirs = before.filter(pc.equal(before.column("source"), name))
        assert g["rows"] == {"today": mine.num_rows, "baseline": theirs.num_rows}
        assert g["corpus_ppl"]["change"] == pytest.approx(
            _corpus_ppl(mine) / _corpus_ppl(theirs) - 1, rel=1e-9
        )
        exact = exact_ks(mine.column("ppl").to_numpy(), theirs.column("ppl").to_numpy())
        assert g["ks"] <= exact + 1e-12 <= g["ks"] + g["ks_bound"] + 1e-12
    page = (day3 / "report" / "report.html").read_text()
    assert "Compared with the baseline" in page and "Drift past the threshold" in page

    # `fengshen-batch report` redoes the comparison from the job's own baseline, and exits 3 as the job did
    shutil.rmtree(day3 / "report")
    res = CliRunner().invoke(main, ["report", str(day3)])
    assert res.exit_code == DRIFT_EXIT_CODE, res.output
    assert json.loads((day3 / "report" / "summary.json").read_text())["comparison"] == comparison


@pytest.mark.usefixtures("ray_cluster")
def test_a_baseline_of_another_model_or_stride_is_refused_before_anything_runs(tmp_path, replica):
    write_texts(tmp_path / "in", files=(6, 5), repeat_every=2)
    _score(replica.source, tmp_path / "in", tmp_path / "base")
    other = build_tiny_gpt2(tmp_path / "other-gpt2", n_positions=48, vocab_size=300, seed=1)
    with pytest.raises(JobError, match=r"model .*tokenizer"):
        _score(str(other), tmp_path / "in", tmp_path / "a", baseline=str(tmp_path / "base"))
    assert not (tmp_path / "a").exists()  # refused before the job started
    _score(replica.source, tmp_path / "in", tmp_path / "s8", stride=8)
    with pytest.raises(JobError, match=r"stride 8 \(today 16\)"):
        _score(replica.source, tmp_path / "in", tmp_path / "b", stride=16, baseline=str(tmp_path / "s8"))
    # the same model copied elsewhere: its files match, its path does not; the user may compare anyway
    copy = tmp_path / "copy"
    shutil.copytree(replica.source, copy)
    with pytest.raises(JobError, match="baseline_check: false"):
        _score(str(copy), tmp_path / "in", tmp_path / "c", baseline=str(tmp_path / "base"))
    manifest = _score(
        str(copy), tmp_path / "in", tmp_path / "c", baseline=str(tmp_path / "base"), baseline_check=False
    )
    summary = json.loads((tmp_path / "c" / "report" / "summary.json").read_text())
    assert summary["comparison"]["corpus_ppl"]["change"] == pytest.approx(0, abs=1e-12)
    assert (
        manifest["model_fingerprint"]
        == json.loads((tmp_path / "base" / "manifest.json").read_text())["model_fingerprint"]
    )
    # not a finished score job
    with pytest.raises(JobError, match="no _SUCCESS"):
        _score(replica.source, tmp_path / "in", tmp_path / "d", baseline=str(tmp_path / "nowhere"))
    # ... unless the spec says a missing baseline (a nightly's first night) only skips the comparison
    first = _score(replica.source, tmp_path / "in", tmp_path / "d", baseline=str(tmp_path / "nowhere"),
                   baseline_missing="skip", drift_threshold=0.01)  # fmt: skip
    assert "no _SUCCESS" in first["baseline_skipped"] and "drift" not in first
    assert "comparison" not in json.loads((tmp_path / "d" / "report" / "summary.json").read_text())


def test_nightly_specs_name_yesterdays_output(tmp_path, monkeypatch):
    spec = tmp_path / "nightly.yaml"
    spec.write_text("kind: score\nmodel: m/\ninput: in/{date}/\noutput: out/{date}/\nbaseline: out/{date-1}/\n"
                    "drift_threshold: 0.05\n")  # fmt: skip
    monkeypatch.setenv("FENGSHEN_RUN_DATE", "2026-03-01")
    job = load_spec(spec)
    assert (job.output, job.baseline) == ("out/2026-03-01/", "out/2026-02-28/")
    assert job.drift_threshold.ppl_change == 0.05 and job.drift_threshold.ks is None
