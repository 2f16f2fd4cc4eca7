"""Few-shot prompts built by the job: keyed draws the same across shard sizes, actors and reruns, strata,
no self-example, `few_shot_ids` recorded, every example used with `sets`, the refusals before any model
loads, and a job equal to the same prompts prebuilt into its input."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import fengshen_batch as fb
from fengshen_batch.cli import main
from fengshen_batch.kinds.few_shot import FewShotDraw, Pool, example_sets

TOPICS = ["天气", "city", "food"]


def _examples(path, n=24):
    rows = [{"ex_id": f"r{i}" if i < 3 else f"e{i}", "q": f"q{i}", "a": f"a{i}", "topic": TOPICS[i % 3]}
            for i in range(n)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), path)
    return rows


def _inputs(folder, n=30):
    rows = [{"id": f"r{i}", "question": f"问{i}", "topic": TOPICS[i % 3]} for i in range(n)]
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), folder / "in.parquet")
    return rows


def _few_shot(tmp_path, **extra):
    return {"examples": str(tmp_path / "ex.parquet"), "k": 3, "id_column": "ex_id", "separator": "\n",
            "example_template": "{q}={a}", "stratify_by": "topic", **extra}  # fmt: skip


def _job(tmp_path, replica, out, **extra):
    fields = dict(model=str(replica.source), input=str(tmp_path / "in"), output=str(tmp_path / out),
                  prompt_template="{question}=", max_new_tokens=6, temperature=0.9, seed=5)  # fmt: skip
    return fb.GenerateJob(**{**fields, **extra})


def test_sets_use_every_example_and_draws_are_keyed():
    indices = list(range(10))
    sets = example_sets(indices, 3, 4, seed=1, stratum="a", layout="flat")
    assert all(len(set(s)) == 3 for s in sets) and set().union(*map(set, sets)) == set(indices)
    assert sets == example_sets(indices, 3, 4, 1, "a", "flat") != example_sets(indices, 3, 4, 2, "a", "flat")
    # tree: 64 sets of 3 over 50 examples: 4 first examples, 16 first pairs, every example used
    tree = example_sets(list(range(50)), 3, 64, seed=1, stratum="a")
    assert all(len(set(s)) == 3 for s in tree) and len({tuple(s) for s in tree}) == 64
    assert len({s[0] for s in tree}) == 4 and len({tuple(s[:2]) for s in tree}) == 16
    assert set().union(*map(set, tree)) == set(range(50))
    rows = [{"id": f"x{i}", "t": str(i), "s": i % 2} for i in range(12)]
    pool = Pool.from_rows(rows, "id", "{t}", ["t"], "s")
    for sets_ in (None, 3):
        draw = FewShotDraw(pool, 2, "\n", seed=7, sets=sets_)
        for rid in ("x0", "x3", "other"):
            for s in (0, 1):
                got = draw.examples(rid, s)
                assert got == draw.examples(rid, s) and len(set(got)) == 2
                assert all(rows[i]["s"] == s and rows[i]["id"] != rid for i in got)
    assert FewShotDraw(pool, 7, "\n", 7, None).examples("x0", 0).kind == "few_shot_too_few"


@pytest.mark.usefixtures("ray_cluster")
def test_a_few_shot_job_equals_its_prompts_prebuilt_and_draws_do_not_depend_on_shards(tmp_path, replica):
    examples = _examples(tmp_path / "ex.parquet")
    rows = _inputs(tmp_path / "in")
    job = fb.run(
        _job(tmp_path, replica, "a", shard_rows=4, report_by="topic", few_shot=_few_shot(tmp_path, sets=4)),
        progress=None,
    )
    data = {r["id"]: r for r in pq.read_table(tmp_path / "a" / "data").to_pylist()}
    by_id = {e["ex_id"]: e for e in examples}
    for r in rows:
        ids = data[r["id"]]["few_shot_ids"]
        assert len(ids) == 3 and r["id"] not in ids  # r0..r2 are example ids too: never a row's own
        assert all(by_id[i]["topic"] == r["topic"] for i in ids)
    assert len({tuple(d["few_shot_ids"]) for d in data.values()}) <= 4 * len(TOPICS)
    # at most 12 headers over 30 rows: rows after the first of their header take it from the prefix cache
    assert job.counts["cached_prompt_tokens"] > 0
    assert sum(d["cached_prompt_tokens"] for d in data.values()) == job.counts["cached_prompt_tokens"]
    # the report: distinct headers, examples used and the cache's share, overall and per stratum
    summary = json.loads((tmp_path / "a" / "report" / "summary.json").read_text())
    headers = {tuple(d["few_shot_ids"]) for d in data.values()}
    assert summary["few_shot"] == {
        "distinct_headers": len(headers), "examples_used": len({e for h in headers for e in h}),
        "prefix_cache_hit_rate": job.counts["cached_prompt_tokens"] / job.counts["prompt_tokens"]}  # fmt: skip
    for topic, group in summary["groups"].items():
        rows_of = [d for d in data.values() if d["topic"] == topic]
        assert group["few_shot"]["distinct_headers"] == len({tuple(d["few_shot_ids"]) for d in rows_of})
    assert "Few-shot by topic" in (tmp_path / "a" / "report" / "report.html").read_text()
    # which outputs did each example shape: the report rebuilt by the list column, a group per example id
    res = CliRunner().invoke(main, ["report", str(tmp_path / "a"), "--by", "few_shot_ids"])
    assert res.exit_code == 0, res.output
    by_example = json.loads((tmp_path / "a" / "report" / "summary.json").read_text())["groups"]
    used = {e for d in data.values() for e in d["few_shot_ids"]}
    assert {g: f["samples"] for g, f in by_example.items()} == {
        e: sum(e in d["few_shot_ids"] for d in data.values()) for e in used
    }

    # an interrupted run resumed: the same draws and samples in the shards it recomputes
    out = tmp_path / "a"
    for name in ("part-000001.json", "part-000003.json", "_SUCCESS", "manifest.json"):
        (out / ("_markers" if name.startswith("part") else "") / name).unlink()
    again = fb.run(_job(tmp_path, replica, "a", shard_rows=4, report_by="topic", few_shot=_few_shot(tmp_path, sets=4)),
                   progress=None)  # fmt: skip
    assert again.manifest["resumed_shards"] == job.manifest["shards"] - 2

    def drop_cache(rows):  # which prompt tokens the cache supplied depends on what ran before: not an output
        return {r["id"]: {c: v for c, v in r.items() if c != "cached_prompt_tokens"} for r in rows}

    assert drop_cache(pq.read_table(out / "data").to_pylist()) == drop_cache(data.values())
    # a changed pool is another job: refused over this output, before any model loads
    changed = [{**e, "a": "changed"} if e["ex_id"] == "e5" else e for e in examples]
    pq.write_table(pa.Table.from_pylist(changed), tmp_path / "ex2.parquet")
    with pytest.raises(fb.JobError, match="few_shot_examples_fingerprint"):
        fb.run(_job(tmp_path, replica, "a", shard_rows=4, report_by="topic",
                    few_shot={**_few_shot(tmp_path, sets=4), "examples": str(tmp_path / "ex2.parquet")}),
               progress=None)  # fmt: skip

    # other shards and two actors: rows routed by header (12 sets, 9 distinct first pairs, dealt to 2
    # routes), the same draws and the same outputs
    b = fb.run(_job(tmp_path, replica, "b", shard_rows=11, actors=2, few_shot=_few_shot(tmp_path, sets=4)),
               progress=None)  # fmt: skip
    assert b.manifest["routes"] == 2 and b.manifest["shards"] == 3 * 2  # 3 ranges, each split in 2
    other = {r["id"]: r for r in pq.read_table(tmp_path / "b" / "data").to_pylist()}
    cols = ("few_shot_ids", "generation", "generation_nll_sum")  # the same draws and samples
    assert {i: [r[c] for c in cols] for i, r in other.items()} == {
        i: [r[c] for c in cols] for i, r in data.items()
    }

    def routes_of_prefixes(out):  # {the first two examples of a header: the routes whose shards held it}
        markers = {
            m["shard"]: m for m in map(json.loads, map(Path.read_text, (out / "_markers").glob("*.json")))
        }
        found = {}
        for path in (out / "data").glob("*.parquet"):
            for ids in pq.read_table(path, columns=["few_shot_ids"]).column(0).to_pylist():
                found.setdefault(tuple(ids[:2]), set()).add(markers[int(path.stem[5:11])]["route"])
        return found

    found = routes_of_prefixes(tmp_path / "b")
    assert all(len(r) == 1 for r in found.values()) and set().union(*found.values()) == {0, 1}
    # resumed on one actor: the first run's routing kept (the committed shards mean the same rows)
    for name in ("_markers/part-000004.json", "_SUCCESS", "manifest.json"):
        (tmp_path / "b" / name).unlink()
    again = fb.run(_job(tmp_path, replica, "b", shard_rows=11, few_shot=_few_shot(tmp_path, sets=4)),
                   progress=None)  # fmt: skip
    assert again.manifest["resumed_shards"] == 5 and again.manifest["routes"] == 2
    assert drop_cache(pq.read_table(tmp_path / "b" / "data").to_pylist()) == drop_cache(other.values())
    assert routes_of_prefixes(tmp_path / "b") == found

    # the same prompts written into the input by hand: the same samples (same ids, same seed)
    def prompt(r):
        ex = [by_id[i] for i in data[r["id"]]["few_shot_ids"]]
        return "".join(f"{e['q']}={e['a']}\n" for e in ex) + f"{r['question']}="

    (tmp_path / "pre").mkdir()
    pq.write_table(pa.Table.from_pylist([{"id": r["id"], "prompt": prompt(r)} for r in rows]),
                   tmp_path / "pre" / "p.parquet")  # fmt: skip
    fb.run(fb.GenerateJob(model=str(replica.source), input=str(tmp_path / "pre"), output=str(tmp_path / "c"),
                          max_new_tokens=6, temperature=0.9, seed=5), progress=None)  # fmt: skip
    pre = {r["id"]: r for r in pq.read_table(tmp_path / "c" / "data").to_pylist()}
    assert {i: r["generation"] for i, r in pre.items()} == {i: r["generation"] for i, r in data.items()}


@pytest.mark.usefixtures("ray_cluster")
def test_independent_draws_and_a_stratum_too_small_as_row_errors(tmp_path, replica):
    _examples(tmp_path / "ex.parquet", n=12)  # 4 per topic; r0, r1, r2 are example ids too
    _inputs(tmp_path / "in", n=9)
    few_shot = _few_shot(tmp_path, k=4, too_few="row_error")  # rows r0..r2 have 3 examples besides their own
    fb.run(_job(tmp_path, replica, "a", few_shot=few_shot), progress=None)
    errors = {r["id"]: r["error_kind"] for r in pq.read_table(tmp_path / "a" / "errors").to_pylist()}
    assert errors == {"r0": "few_shot_too_few", "r1": "few_shot_too_few", "r2": "few_shot_too_few"}
    data = pq.read_table(tmp_path / "a" / "data").to_pylist()
    assert len(data) == 6 and len({tuple(r["few_shot_ids"]) for r in data}) > 3  # drawn (and ordered) per row


@pytest.mark.parametrize(
    "change, message",
    [
        ({"examples": "nope.parquet"}, "cannot read"),
        ({"example_template": "{q} {missing}"}, "no column 'missing'"),
        ({"k": 9}, "fewer than k=9"),
        ({"example_template": "{}"}, "must name columns"),
    ],
)
def test_few_shot_refusals_are_one_line_before_any_model_loads(tmp_path, tiny_model_dir, change, message):
    _examples(tmp_path / "ex.parquet")
    _inputs(tmp_path / "in")
    fs = _few_shot(tmp_path, **change)
    if change.get("examples"):
        fs["examples"] = str(tmp_path / change["examples"])
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({"kind": "generate", "model": str(tiny_model_dir), "input": str(tmp_path / "in"),
                                "output": str(tmp_path / "out"), "prompt_template": "{question}",
                                "max_new_tokens": 8, "few_shot": fs}))  # fmt: skip
    res = CliRunner().invoke(main, ["run", str(spec)])
    assert res.exit_code == 2 and message in res.output and "few_shot" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_header_that_cannot_fit_the_context_is_refused(tmp_path, tiny_model_dir):
    rows = [{"ex_id": f"e{i}", "q": "很长的问题" * 8, "a": "a", "topic": "x"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ex.parquet")
    _inputs(tmp_path / "in")
    job = fb.GenerateJob(model=str(tiny_model_dir), input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                         prompt_template="{question}", max_new_tokens=8,
                         few_shot={**_few_shot(tmp_path), "stratify_by": None})  # fmt: skip
    with pytest.raises(fb.SpecError, match="the longest header is about"):
        fb.run(job, progress=None)
