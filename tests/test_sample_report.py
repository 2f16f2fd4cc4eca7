"""The generation report: every figure against an exact computation over the output's rows.

The summaries are merged from shards (`sample_sketch.py`) and the distinct counts may be HyperLogLog
estimates (`distinct.py`), so each is checked against a plain, unsharded computation here: counts and
integer quantiles exactly, NLL quantiles within half a bin, estimated distinct counts within 4 standard errors.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from fengshen_batch.cli import main
from fengshen_batch.job.run import run_job
from fengshen_batch.reports import distinct
from fengshen_batch.reports.generate_sketch import (
    LOOP_MIN_WORDS,
    LOOP_PERIODS,
    LOOP_REPEATS,
    NLL_WIDTH,
    WORD,
    figures,
    merge,
    normalize,
    summarize,
)
from fengshen_batch.reports.histograms import NULL_GROUP, QUANTILES
from fengshen_batch.spec import build_spec
from fengshen_batch.tiny_model import SAMPLE_LINES


def _loop(words: list[str]) -> int:
    """The longest loop of a word list, by the definition, one position at a time."""
    best = 0
    for p in range(1, LOOP_PERIODS + 1):
        run = 0
        for i in range(p, len(words) + 1):
            if i < len(words) and words[i] == words[i - p]:
                run += 1
                continue
            if run + p >= LOOP_REPEATS * p and run + p >= LOOP_MIN_WORDS:
                best = max(best, run + p)
            run = 0
    return best


def _quantiles(values) -> dict:
    return {f"p{round(q * 100):02d}": float(np.quantile(values, q)) for q in QUANTILES} if len(values) else {}


def exact_figures(rows: list[dict]) -> dict:
    """The report's figures from the rows themselves (rows in output order)."""
    prompts: dict[str, list[dict]] = {}
    for r in rows:
        prompts.setdefault(r["id"], []).append(r)
    words = [WORD.findall(r["generation"]) for r in rows]
    unigrams = [w for ws in words for w in ws]
    bigrams = [(a, b) for ws in words for a, b in zip(ws[:-1], ws[1:], strict=True)]
    scored = [r for r in rows if r["generated_tokens"] > 0]
    reasons = sorted({r["finish_reason"] for r in rows})
    multi = [p for p in prompts.values() if len(p) > 1]
    tokens = sum(r["generated_tokens"] for r in scored)
    return {
        "samples": len(rows),
        "prompts": len(prompts),
        "finish_reasons": {k: sum(r["finish_reason"] == k for r in rows) for k in reasons},
        "generated_tokens_sum": sum(r["generated_tokens"] for r in rows),
        "generated_tokens_quantiles": _quantiles([r["generated_tokens"] for r in rows]),
        "by_reason_quantiles": {
            k: _quantiles([r["generated_tokens"] for r in rows if r["finish_reason"] == k]) for k in reasons
        },
        "limit_hit_fraction": sum(r["finish_reason"] == "length" for r in rows) / len(rows),
        "nll_mean": sum(r["generation_nll_sum"] for r in scored) / tokens if tokens else None,
        "nll_quantiles": _quantiles([r["generation_nll_sum"] / r["generated_tokens"] for r in scored]),
        "prompt_tokens_quantiles": _quantiles([p[0]["prompt_tokens"] for p in prompts.values()]),
        "distinct_texts": len({normalize(r["generation"]) for r in rows}),
        "collapsed_prompts": sum(len({normalize(r["generation"]) for r in p}) == 1 for p in multi)
        if multi
        else None,
        "distinct_words": len(set(unigrams)),
        "words": len(unigrams),
        "distinct_bigrams": len(set(bigrams)),
        "bigrams": len(bigrams),
        "repetition_loops": sum(_loop(ws) > 0 for ws in words),
    }


def assert_figures_match(got: dict, rows: list[dict]) -> None:
    want = exact_figures(rows)
    for key in ("samples", "prompts", "finish_reasons", "collapsed_prompts", "repetition_loops"):
        assert got[key] == want[key], key
    assert got["generated_tokens"]["sum"] == want["generated_tokens_sum"]
    assert got["generated_tokens"]["quantiles"] == pytest.approx(
        want["generated_tokens_quantiles"]
    )  # exact bins
    for reason, q in want["by_reason_quantiles"].items():
        assert got["generated_tokens"]["by_finish_reason"][reason]["quantiles"] == pytest.approx(q)
    assert got["prompt_tokens"]["quantiles"] == pytest.approx(want["prompt_tokens_quantiles"])
    assert got["limit_hit_fraction"] == pytest.approx(want["limit_hit_fraction"])
    assert got["nll_per_token"]["mean"] == pytest.approx(want["nll_mean"], rel=1e-9)
    for k, v in want["nll_quantiles"].items():  # within half a 0.001-nat bin
        assert got["nll_per_token"]["quantiles"][k] == pytest.approx(v, abs=NLL_WIDTH / 2 + 1e-12), k

    def check(estimate: float, exact_count: int, is_exact: bool) -> None:
        if is_exact:
            assert estimate == pytest.approx(exact_count, rel=1e-12)
        else:  # HyperLogLog: 4 standard errors
            assert abs(estimate - exact_count) <= 4 * distinct.RELATIVE_ERROR * exact_count + 1

    check(
        want["samples"] - got["duplicate_samples"], want["distinct_texts"], got["exact"]["duplicate_samples"]
    )
    check(got["distinct_1"] * want["words"], want["distinct_words"], got["exact"]["distinct_1"])
    check(got["distinct_2"] * want["bigrams"], want["distinct_bigrams"], got["exact"]["distinct_2"])


# ---------------------------------------------------------------------------------------------- sketches


@pytest.mark.parametrize("n", [10, distinct.EXACT_LIMIT, 5_000, 60_000, 400_000])
def test_distinct_counts_within_the_stated_error(n):
    items = [f"sample {i}" for i in range(n)]
    hashes = distinct.stable_hashes(items + items[: n // 3])  # a third of them twice
    parts = [distinct.sketch(h) for h in np.array_split(hashes, 7)]
    merged = distinct.merge(parts)
    assert distinct.merge(parts[::-1]) == merged  # any order, any grouping
    assert distinct.merge([distinct.merge(parts[:3]), distinct.merge(parts[3:])]) == merged
    if n <= distinct.EXACT_LIMIT:
        assert distinct.is_exact(merged) and distinct.count(merged) == n
    else:
        assert not distinct.is_exact(merged)
        assert abs(distinct.count(merged) - n) <= 3 * distinct.RELATIVE_ERROR * n


def test_stable_hashes_do_not_depend_on_the_process():
    code = "from fengshen_batch.reports.distinct import stable_hashes; print(stable_hashes(['北京', 'a b']).tolist())"
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": s},
            check=True,
        ).stdout  # fmt: skip
        for s in ("1", "2")
    }
    assert len(runs) == 1


def test_words_and_loops():
    assert WORD.findall("北京天气很好, hello world!") == [*"北京天气很好", ",", "hello", "world", "!"]
    assert _loop(["a", "b", "c", "d"] * 4) == 16  # a 4-gram 4 times
    assert _loop(["a", "b", "c", "d"] * 3 + ["e"]) == 0  # 3 times is not a loop
    assert _loop(list("哈" * 15)) == 0 and _loop(list("哈" * 16)) == 16  # 16 words at least
    assert _loop(["x", "y"] + ["the", "cat", "sat"] * 6 + ["end"]) == 18
    assert _loop(WORD.findall(SAMPLE_LINES[0] + SAMPLE_LINES[5])) == 0


def _rows(n_prompts: int, n: int, seed: int) -> list[dict]:
    """Samples shaped like a sampling job's: duplicates across prompts, collapsed prompts, loops, zero-token
    samples, mixed languages and lengths."""
    rng = random.Random(seed)
    vocabulary = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "away", *"北京天气很好。，"]
    rows = []
    for i in range(n_prompts):
        collapsed = i % 9 == 0
        source = rng.choice(["web", "book", None])  # an input column: one value per prompt
        for j in range(n):
            length = rng.randint(0, 60)
            text = " ".join(rng.choice(vocabulary) for _ in range(length))
            if collapsed:
                text = f"Same  answer {i % 4}" if j else f"same answer {i % 4} "  # equal once normalised
            elif i % 13 == 5:
                text = "loop again " * rng.randint(6, 12)
            rows.append({
                "id": f"row{i}", "sample_index": j, "prompt": f"prompt {i}", "generation": text,
                "prompt_tokens": rng.randint(1, 40), "generated_tokens": length,
                "finish_reason": "length" if length >= 55 else "stop",
                "generation_nll_sum": rng.uniform(0.5, 6.0) * length, "source": source,
            })  # fmt: skip
        for r in rows[-n:]:  # the prompt's token count is one per prompt
            r["prompt_tokens"] = rows[-n]["prompt_tokens"]
    return rows


@pytest.mark.parametrize("n_prompts", [40, 1500])  # exact sketches; HyperLogLog ones
def test_merged_shard_summaries_equal_the_exact_figures(n_prompts):
    rows = _rows(n_prompts, 3, seed=n_prompts)
    table = pa.Table.from_pylist(rows)
    cuts = [0, *sorted(random.Random(1).sample(range(1, n_prompts), 6)), n_prompts]
    shards = [
        summarize(table.slice(3 * a, 3 * (b - a)), "prompt", "source")
        for a, b in zip(cuts[:-1], cuts[1:], strict=True)
    ]
    merged = merge(random.Random(2).sample(shards, len(shards)))
    got = figures(merged)
    assert_figures_match(got, rows)
    assert figures(merge(shards)) == got  # the same whatever the order
    whole = summarize(table, "prompt", "source")
    assert figures(whole) == got and whole["examples"] == merged["examples"]
    for group, part in merged["groups"].items():  # nulls their own group; the groups add up to the total
        assert_figures_match(
            figures(part), [r for r in rows if str(r["source"]) == group.replace(NULL_GROUP, "None")]
        )
    assert sum(g["samples"] for g in merged["groups"].values()) == len(rows)
    lowest = min(
        (r for r in rows if r["generated_tokens"]),
        key=lambda r: r["generation_nll_sum"] / r["generated_tokens"],
    )
    assert merged["examples"]["lowest_nll"][0]["id"] == lowest["id"]
    assert merged["examples"]["longest_loops"][0]["loop_words"] == max(
        _loop(WORD.findall(r["generation"])) for r in rows
    )


# ------------------------------------------------------------------------------------------------ the job


def _prompts(folder, n=30):
    """Prompts with a `source` column (some null), repeated prompts (equal greedy outputs) and per-row limits."""
    folder.mkdir(parents=True, exist_ok=True)
    prompts = [SAMPLE_LINES[i % 7][: 4 + i % 9] for i in range(n)]
    sources = [None if i % 5 == 0 else f"s{i % 3}" for i in range(n)]
    limits = [None if i % 4 else 3 for i in range(n)]
    pq.write_table(pa.table({"prompt": prompts, "source": sources, "n": pa.array(limits, pa.int64())}),
                   folder / "part-0.parquet")  # fmt: skip
    pq.write_table(pa.table({"prompt": [None, "ok"], "source": ["s0", "s1"], "n": pa.array([None, 0], pa.int64())}),
                   folder / "part-1.parquet")  # fmt: skip


def _summary(out) -> dict:
    return json.loads((out / "report" / "summary.json").read_text())


@pytest.mark.usefixtures("ray_cluster")
def test_generate_report_matches_the_output_and_survives_a_resume(tmp_path, replica):
    _prompts(tmp_path / "in")
    out = tmp_path / "out"
    fields = {"kind": "generate", "model": replica.source, "input": str(tmp_path / "in"), "output": str(out),
              "shard_rows": 7, "num_return_sequences": 3, "temperature": 0.7, "top_k": 4, "seed": 3,
              "max_new_tokens": 24, "max_new_tokens_column": "n", "stop": ["。"], "report_by": "source"}  # fmt: skip
    manifest = run_job(build_spec(fields), progress=lambda _: None)
    summary = _summary(out)
    rows = pq.read_table(out / "data").to_pylist()
    assert_figures_match(summary, rows)
    for group, part in summary["groups"].items():
        assert_figures_match(part, [r for r in rows if str(r["source"]) == group.replace(NULL_GROUP, "None")])
    assert summary["errors"] == manifest["counts"]["error_kinds"] == {"null_text": 1, "bad_max_new_tokens": 1}
    assert 0 < summary["limit_hit_fraction"] < 1 and summary["repetition_loops"] >= 0
    assert manifest["finish_seconds"]["report"] > 0
    page = (out / "report" / "report.html").read_text()
    for name in ("lengths.png", "nll_per_token.png"):  # beside the page, and inside it (a page mailed alone)
        png = (out / "report" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and base64.b64encode(png).decode() in page
    random_ids = {r["id"] for r in _examples(out, "random")}
    assert all(i in page for i in random_ids)
    assert "<code>null_text</code></td><td>1</td>" in page  # errors by kind

    # an interrupted run (two shards uncommitted, no report) reports exactly what the whole run did
    for name in ("part-000001.json", "part-000003.json"):
        (out / "_markers" / name).unlink()
    for name in ("_SUCCESS", "manifest.json"):
        (out / name).unlink()
    shutil.rmtree(out / "report")
    again = run_job(build_spec(fields), progress=lambda _: None)
    assert again["resumed_shards"] == manifest["shards"] - 2
    assert _summary(out) == summary

    # `fengshen-batch report` rebuilds it from the markers, and by another column from the data files
    shutil.rmtree(out / "report")
    res = CliRunner().invoke(main, ["report", str(out)])
    assert res.exit_code == 0 and "samples" in res.output, res.output
    assert _summary(out) == summary
    res = CliRunner().invoke(main, ["report", str(out), "--by", "finish_reason"])
    assert res.exit_code == 0, res.output
    by_reason = _summary(out)
    assert {g: f["samples"] for g, f in by_reason["groups"].items()} == summary["finish_reasons"]
    assert {k: v for k, v in by_reason.items() if k not in ("by", "groups")} == {
        k: v for k, v in summary.items() if k not in ("by", "groups")
    }


def _examples(out, key: str) -> list[dict]:
    page_rows = pq.read_table(out / "data").to_pylist()
    keys = distinct.stable_hashes(f"{r['id']}\x1f{r['sample_index']}" for r in page_rows)
    order = sorted(zip(keys.tolist(), range(len(page_rows)), strict=True))
    return [page_rows[i] for _, i in order[:10]]


@pytest.mark.usefixtures("ray_cluster")
def test_greedy_samples_collapse_and_keep_best_reports_the_kept_samples(tmp_path, replica):
    _prompts(tmp_path / "in", n=12)
    base = {"kind": "generate", "model": replica.source, "input": str(tmp_path / "in"), "max_new_tokens": 16}
    # greedy: n samples of a prompt are one text, and repeated prompts give duplicate samples
    run_job(build_spec({**base, "output": str(tmp_path / "greedy"), "greedy": True, "num_return_sequences": 2}),
            progress=lambda _: None)  # fmt: skip
    summary = _summary(tmp_path / "greedy")
    assert summary["collapsed_prompts"] == summary["prompts"] == 13  # the part-1 row "ok" too
    assert summary["duplicate_samples"] >= 13 and summary["exact"]["duplicate_samples"]
    assert_figures_match(summary, pq.read_table(tmp_path / "greedy" / "data").to_pylist())
    # best-of-4, keep 2: the report covers the kept samples and counts the dropped ones
    manifest = run_job(build_spec({**base, "output": str(tmp_path / "best"), "num_return_sequences": 4,
                                   "keep_best": 2, "seed": 1}), progress=lambda _: None)  # fmt: skip
    summary = _summary(tmp_path / "best")
    kept = pq.read_table(tmp_path / "best" / "data").to_pylist()
    assert summary["samples"] == len(kept) == 26
    assert summary["dropped_samples"] == manifest["counts"]["dropped_samples"] == 26
    assert_figures_match(summary, kept)
    assert "samples dropped by keep_best" in (tmp_path / "best" / "report" / "report.html").read_text()


@pytest.mark.skipif(
    not shutil.which("chromium"), reason="Chromium is not installed (Debian package chromium)"
)
def test_generate_report_opens_in_headless_chromium_with_its_images(tmp_path):
    from PIL import Image

    from fengshen_batch.io.outputs import OutputStore
    from fengshen_batch.io.storage import StorageSpec
    from fengshen_batch.reports.generate_report import build_sample_report

    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    rows = _rows(30, 2, seed=5)
    rows[0]["generation"] = "<script>alert(1)</script>"
    pq.write_table(pa.Table.from_pylist(rows), out / "data" / "part-000000.parquet")
    manifest = {
        "model": "m",
        "spec": {"kind": "generate", "input": "in/"},
        "counts": {"error_kinds": {"null_text": 2}},
    }
    summary = build_sample_report(OutputStore(str(out), StorageSpec()), manifest)
    assert_figures_match(summary, rows)  # rebuilt from the data files
    page = (out / "report" / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page  # every text escaped
    shot = tmp_path / "shot.png"
    from tests.helpers import screenshot

    res = screenshot(out / "report" / "report.html", shot, tmp_path / "profile", "1200,900")
    assert res.returncode == 0, res.stderr[-2000:]
    # the histograms were drawn on the page: their bar colours (stop blue, length red) are on screen
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    for colour in ((0x3B, 0x6E, 0xA5), (0xC4, 0x4E, 0x52)):
        assert (np.abs(pixels - colour).sum(axis=1) < 12).sum() > 200, colour


def test_report_by_leaves_older_generate_outputs_their_spec_hash():
    from fengshen_batch.io.outputs import spec_hash
    from fengshen_batch.spec import spec_record

    fields = {"kind": "generate", "model": "m/", "input": "in/", "output": "out/"}
    record = spec_record(build_spec(fields))
    before = {k: v for k, v in record.items() if k != "report_by"}  # as a version without report_by wrote it
    assert spec_hash(record) == spec_hash(before)
    assert spec_hash(spec_record(build_spec({**fields, "report_by": "source"}))) != spec_hash(before)


def test_an_all_errors_shard_summarises_to_nothing():
    empty = pa.Table.from_pylist(_rows(2, 2, seed=0)).slice(0, 0)
    got = figures(merge([summarize(empty, "prompt", "source"), summarize(empty, None, "source")]))
    assert got["samples"] == got["prompts"] == got["repetition_loops"] == got["duplicate_samples"] == 0
    assert got["limit_hit_fraction"] is None and got["generated_tokens"]["quantiles"] == {}
