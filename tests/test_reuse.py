"""Nightly scoring that reuses earlier results (`reuse:`): a row whose text an earlier output scored takes
that output's result columns bit for bit, the rest are scored, and the output, its report and its drift
comparison are those of a full rescoring of the night."""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from fengshen_batch.cli import main
from fengshen_batch.job.run import run_job
from fengshen_batch.spec import build_spec
from tests.helpers import write_texts

RESULTS = ["nll_sum", "token_count", "ppl", "byte_count", "bits_per_byte"]


def _spec(replica, inp, out, **extra) -> dict:
    return {"kind": "score", "model": str(replica.source), "input": str(inp), "output": str(out),
            "report_by": "source", "shard_rows": 9, "actors": 1, **extra}  # fmt: skip


def _cli_run(tmp_path, name: str, fields: dict):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(fields))
    return CliRunner().invoke(main, ["run", str(path)])


def _by_text(out) -> dict[str, dict]:
    """Each text's first row (texts repeat in the corpus; a text's results are the same on every row)."""
    rows = {}
    for r in pq.read_table(out / "data").to_pylist():
        rows.setdefault(r["text"], r)
    return rows


def _night(tmp_path, night1: list[str]) -> tuple[list[str], set[str]]:
    """Tonight's corpus from last night's texts: 90% unchanged but in other files, reordered, with new
    passthrough values; 5% edited; 5% new. Returns (tonight's texts, the texts last night did not have)."""
    rng = random.Random(5)
    texts = list(night1)
    rng.shuffle(texts)
    n = len(texts)
    edited = [t + f" 修订第{i}版" for i, t in enumerate(texts[: max(1, n // 20)])]
    new = [f"New document number {i}: 全新的内容。" for i in range(max(1, n // 20))]
    tonight = edited + texts[len(edited) : n - len(new)] + new
    rng.shuffle(tonight)
    folder = tmp_path / "night2"
    half = len(tonight) // 2
    for name, part in (("b-rewritten.parquet", tonight[:half]), ("a-rewritten.parquet", tonight[half:])):
        folder.mkdir(exist_ok=True)
        pq.write_table(pa.table({"text": part, "source": [f"feed{i % 2}" for i in range(len(part))],
                                 "fetched": [f"2026-12-02T0{i % 10}" for i in range(len(part))]}),
                       folder / name)  # fmt: skip
    return tonight, set(edited) | set(new)


def _same(a, b, path=""):
    """Two reports' figures equal to float rounding (timings and where they were written aside)."""
    if isinstance(a, dict):
        skip = {"output", "wall_seconds", "generated_at", "manifest", "baseline_url", "url"}
        assert a.keys() == b.keys(), path
        for k in a.keys() - skip:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), path
    else:
        assert a == b, path


@pytest.mark.usefixtures("ray_cluster")
def test_reuse_takes_unchanged_rows_bit_for_bit_and_the_night_equals_a_full_rescoring(tmp_path, replica):
    write_texts(tmp_path / "night1", files=(14, 13, 13), repeat_every=3)
    n1 = tmp_path / "2026-12-01"
    res = _cli_run(tmp_path, "n1", _spec(replica, tmp_path / "night1", n1))
    assert res.exit_code == 0, res.output
    last = _by_text(n1)
    tonight, changed = _night(tmp_path, [r["text"] for r in pq.read_table(n1 / "data").to_pylist()])

    full, reuse = tmp_path / "2026-12-02-full", tmp_path / "2026-12-02"
    drift = {"baseline": str(n1), "drift_threshold": {"ppl_change": 0.5, "bpb_change": 0.5, "ks": 0.9}}
    res = _cli_run(tmp_path, "full", _spec(replica, tmp_path / "night2", full, **drift))
    assert res.exit_code == 0, res.output
    # the user's way in: the score command with --reuse (a spec's `reuse:` is the same field)
    res = CliRunner().invoke(main, [
        "score", "--model", str(replica.source), "--input", str(tmp_path / "night2"), "--output", str(reuse),
        "--report-by", "source", "--shard-rows", "9", "--actors", "1", "--baseline", str(n1),
        "--drift-threshold", "ppl_change=0.5,bpb_change=0.5,ks=0.9", "--reuse", str(n1),
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    unchanged = [t for t in tonight if t not in changed]
    assert f"reuse: {len(unchanged):,} of {len(tonight):,} rows found" in res.output

    got, ref = pq.read_table(reuse / "data"), pq.read_table(full / "data")
    assert got.num_rows == ref.num_rows == len(tonight)
    assert got.column_names == ref.column_names  # passthrough columns as tonight's, results, content key
    for row in got.to_pylist():
        key = hashlib.blake2b(row["text"].encode("utf-8"), digest_size=16).hexdigest()
        assert row["content_key"] == key  # the same text has the same key in any file, order or night
        if row["text"] in changed:
            continue
        assert {c: row[c] for c in RESULTS} == {c: last[row["text"]][c] for c in RESULTS}  # bit for bit
    # every row, reused or scored tonight, equals the full rescoring's (by id: file and row)
    ref_rows = {r["id"]: r for r in ref.to_pylist()}
    for row in got.to_pylist():
        other = ref_rows[row["id"]]
        assert (row["text"], row["source"], row["fetched"]) == (
            other["text"],
            other["source"],
            other["fetched"],
        )
        assert row["token_count"] == other["token_count"]
        assert row["nll_sum"] == pytest.approx(other["nll_sum"], rel=1e-9)

    manifest = json.loads((reuse / "manifest.json").read_text())
    full_manifest = json.loads((full / "manifest.json").read_text())
    assert manifest["reuse"]["reused_rows"] == len(unchanged)
    assert manifest["reuse"]["computed_rows"] == len(tonight) - len(unchanged)
    assert manifest["reuse"]["outputs"] == [{"output": str(n1), "rows": len(unchanged)}]
    scored = pq.read_table(reuse / "data").filter(pc.is_in(pc.field("text"), pa.array(sorted(changed))))
    assert manifest["counts"]["tokens"] == pc.sum(scored.column("token_count")).as_py()  # the model's work
    assert manifest["counts"]["tokens"] < full_manifest["counts"]["tokens"]
    # the report and the drift comparison are the whole night's, as a full rescoring's
    a, b = (json.loads((d / "report" / "summary.json").read_text()) for d in (reuse, full))
    assert a.pop("reuse") == {k: manifest["reuse"][k] for k in ("reused_rows", "computed_rows", "outputs")}
    _same(a, b)
    page = (reuse / "report" / "report.html").read_text()
    assert f"<th>rows reused from earlier outputs</th><td>{len(unchanged)}</td>" in page
    assert manifest["drift"] == full_manifest["drift"]
    assert math.isclose(a["corpus_ppl"], b["corpus_ppl"], rel_tol=1e-12)
    assert not (reuse / "_reuse").exists()  # the lookup's files go once the shards are committed


@pytest.mark.usefixtures("ray_cluster")
def test_several_outputs_first_listed_first_and_a_resumed_reuse_run_counts_each_row_once(tmp_path, replica):
    """Two earlier outputs: a text in both takes the first listed's results; a text only in the second
    takes the second's (planted there, so a recomputation would show); a missing one skipped on request.
    A rerun of an interrupted reuse run redoes its shards' lookups: the same rows, each once."""
    rows = write_texts(tmp_path / "in", files=(14, 13), repeat_every=3)
    a = tmp_path / "a"
    assert run_job(build_spec(_spec(replica, tmp_path / "in", a)), progress=lambda _: None)["counts"]
    b = tmp_path / "b"
    shutil.copytree(a, b)  # the same job's output (same model and settings), its rows changed:
    first = sorted(b.glob("data/*.parquet"))[0]
    table = pq.read_table(first)
    planted = pc.add(table.column("ppl"), 1e9)  # b's ppl of the texts in its first file
    pq.write_table(table.set_column(table.schema.get_field_index("ppl"), "ppl", planted), first)
    only_b = set(table.column("text").to_pylist())
    (a / "data" / first.name).unlink()  # a lost those rows: for them only b has results
    for p in a.glob(f"*/{first.stem}.*"):
        p.unlink()
    only_b -= {r["text"] for r in pq.read_table(a / "data").to_pylist()}
    assert only_b

    out = tmp_path / "out"
    spec = build_spec(_spec(replica, tmp_path / "in", out, reuse=[str(a), str(b), str(tmp_path / "gone")],
                            reuse_mismatch="skip"))  # fmt: skip
    lines: list[str] = []
    manifest = run_job(spec, progress=lines.append)
    assert any("gone has no _SUCCESS" in line and "left out" in line for line in lines)
    got = _by_text(out)
    from_a, from_b = _by_text(a), _by_text(b)
    for text, row in got.items():
        want = from_a.get(text) or from_b[text]
        assert row["ppl"] == want["ppl"], text
        assert (row["ppl"] > 1e8) == (text in only_b)
    assert manifest["reuse"]["reused_rows"] == len(rows)  # every text was scored by one of them
    assert [o["rows"] for o in manifest["reuse"]["outputs"]] == [
        sum(1 for t in rows.values() if t not in only_b), sum(1 for t in rows.values() if t in only_b),
    ]  # fmt: skip
    assert manifest["counts"]["tokens"] == 0
    assert manifest["reuse"]["skipped"] == [line.removesuffix("; left out (reuse_mismatch: skip)")
                                            for line in lines if "left out" in line]  # fmt: skip

    before = pq.read_table(out / "data").sort_by("id")
    (out / "_SUCCESS").unlink()
    (out / "manifest.json").unlink()
    (out / "_markers" / "part-000002.json").unlink()  # a shard not committed when the driver died
    again = run_job(spec, progress=lambda _: None)
    assert again["resumed_shards"] == manifest["shards"] - 1
    assert pq.read_table(out / "data").sort_by("id").equals(before)
    assert again["reuse"]["reused_rows"] == manifest["reuse"]["reused_rows"]
    assert again["reuse"]["outputs"] == manifest["reuse"]["outputs"]


def test_an_output_scored_another_way_is_refused_before_any_model_loads(tmp_path, replica):
    """Reuse of an output whose stride or model differs is one line naming it, exit 2, nothing started."""
    write_texts(tmp_path / "in", files=(3,))
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    spec = _spec(replica, tmp_path / "in", earlier, stride=16)
    manifest = {"spec_hash": "x", "spec": {**spec, "content_key": "blake2b-128/utf-8", "dtype": "auto",
                "result_prefix": ""}, "model": str(replica.source), "counts": {"result_rows": 3}}  # fmt: skip
    (earlier / "manifest.json").write_text(json.dumps(manifest))
    (earlier / "_SUCCESS").write_text("")
    res = _cli_run(tmp_path, "bad", _spec(replica, tmp_path / "in", tmp_path / "out", reuse=str(earlier)))
    assert res.exit_code == 2, res.output
    assert "was scored with another stride 16 (today the context)" in res.output
    assert "reuse_mismatch: skip" in res.output and not (tmp_path / "out").exists()
    manifest["spec"].pop("stride")
    manifest["model"] = manifest["spec"]["model"] = "IDEA-CCNL/Wenzhong-GPT2-3.5B"
    (earlier / "manifest.json").write_text(json.dumps(manifest))
    res = _cli_run(tmp_path, "bad", _spec(replica, tmp_path / "in", tmp_path / "out", reuse=str(earlier)))
    assert res.exit_code == 2 and "another model IDEA-CCNL/Wenzhong-GPT2-3.5B" in res.output, res.output
    manifest["model"] = manifest["spec"]["model"] = str(replica.source)
    manifest["spec"].pop("content_key")  # written before content keys
    (earlier / "manifest.json").write_text(json.dumps(manifest))
    res = _cli_run(tmp_path, "bad", _spec(replica, tmp_path / "in", tmp_path / "out", reuse=str(earlier)))
    assert res.exit_code == 2 and "a version before content keys" in res.output, res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("ray_cluster")
def test_an_output_scored_on_gpus_is_refused_by_a_cpu_run_with_dtype_auto(tmp_path, replica):
    """`dtype: auto` is bfloat16 on GPUs, float32 here: the earlier output's device is checked once Ray says
    tonight's, before any model loads; with reuse_mismatch: skip the job scores everything instead."""
    write_texts(tmp_path / "in", files=(3,))
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    spec = _spec(replica, tmp_path / "in", earlier)
    manifest = {"spec_hash": "x", "spec": {**spec, "content_key": "blake2b-128/utf-8", "dtype": "auto",
                "result_prefix": ""}, "model": str(replica.source), "counts": {"result_rows": 3},
                "gpus_per_actor": 1.0}  # fmt: skip
    (earlier / "manifest.json").write_text(json.dumps(manifest))
    (earlier / "_SUCCESS").write_text("")
    res = _cli_run(tmp_path, "gpu", _spec(replica, tmp_path / "in", tmp_path / "out", reuse=str(earlier)))
    assert res.exit_code == 2, res.output
    assert "was scored on GPUs with dtype auto (bfloat16 or float16), tonight on CPUs" in res.output
    assert "loading the model" not in res.output and not list(tmp_path.glob("out/data/*.parquet"))
    done = run_job(build_spec(_spec(replica, tmp_path / "in", tmp_path / "out2", reuse=[str(earlier)],
                                    reuse_mismatch="skip")), progress=lambda _: None)  # fmt: skip
    assert done["reuse"]["reused_rows"] == 0 and done["reuse"]["computed_rows"] == 3
    assert "tonight on CPUs" in done["reuse"]["skipped"][0] and done["reuse"]["outputs"] == []
