"""The batch job end to end on a real local Ray, on local paths and on s3:// (moto over HTTP on 127.0.0.1)."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import s3fs
import yaml
from click.testing import CliRunner

from fengshen_batch.cli import main
from fengshen_batch.job.run import run_job
from fengshen_batch.kinds.generation import generate
from fengshen_batch.kinds.scoring import score_texts
from fengshen_batch.spec import build_spec
from fengshen_batch.tiny_model import SAMPLE_LINES
from tests.helpers import PLANTED_SECRET, make_bucket

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _texts(n: int, offset: int) -> list[str]:
    return [SAMPLE_LINES[(i + offset) % len(SAMPLE_LINES)] * (1 + i % 3) for i in range(n)]


def write_inputs(put, files=(14, 13, 13)) -> dict[str, dict]:
    """Several Parquet files with a text column and passthrough columns; returns the rows by derived id."""
    rows = {}
    for f, n in enumerate(files):
        texts = _texts(n, f)
        table = pa.table({"text": texts, "source": [f"file{f}"] * n, "n": pa.array(range(n), pa.int32())})
        put(f"part-{f}.parquet", table)
        for i in range(n):
            rows[f"part-{f}.parquet:{i}"] = {"text": texts[i], "source": f"file{f}", "n": i}
    return rows


def _read(fs, path) -> pa.Table:
    return pq.read_table(path, filesystem=fs) if fs else pq.read_table(path)


def check_score_output(table: pa.Table, rows: dict, replica) -> None:
    ids = table.column("id").to_pylist()
    assert collections.Counter(ids) == collections.Counter(list(rows))  # every input row exactly once
    expected, _ = score_texts(replica, [rows[i]["text"] for i in ids])
    for got, ref in zip(table.to_pylist(), expected, strict=True):
        assert {k: got[k] for k in ("text", "source", "n")} == rows[got["id"]]  # passthrough intact
        assert got["token_count"] == ref.token_count
        assert got["nll_sum"] == pytest.approx(ref.nll_sum, rel=1e-5)
        assert got["ppl"] == pytest.approx(ref.ppl, rel=1e-5)
        assert got["bits_per_byte"] == pytest.approx(ref.bits_per_byte, rel=1e-5)


def test_s3_job_through_the_cli(tmp_path, replica, tiny_model_dir, s3_endpoint, s3_options, ray_cluster):
    """The 3-file, 40-row job on s3:// from a separate driver process joining the cluster with --address.

    The S3 endpoint and credentials come from the standard AWS variables only (no --endpoint-url)."""
    make_bucket(s3_options, "corpus")
    fs = s3fs.S3FileSystem(**s3_options)
    for f in tiny_model_dir.iterdir():
        fs.put(str(f), f"corpus/models/tiny/{f.name}")

    def put(name, table):
        with fs.open(f"corpus/in/2026-11-21/{name}", "wb") as fh:
            pq.write_table(table, fh)

    rows = write_inputs(put)
    assert len(rows) == 40
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": PLANTED_SECRET, "AWS_ENDPOINT_URL": s3_endpoint}
    cmd = [
        sys.executable, "-m", "fengshen_batch", "score",
        "--model", "s3://corpus/models/tiny/", "--input", "s3://corpus/in/2026-11-21/",
        "--output", "s3://corpus/out/2026-11-21",
        "--actors", "2", "--shard-rows", "6", "--batch-size", "5", "--address", ray_cluster,
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"s3 job: 40 rows in {wall:.1f}s through the CLI = {40 / wall:.2f} rows/s")

    fs.invalidate_cache()
    out = "corpus/out/2026-11-21"
    assert fs.exists(f"{out}/_SUCCESS") and fs.exists(f"{out}/manifest.json")
    table = _read(fs, f"{out}/data")
    check_score_output(table, rows, replica)
    manifest = yaml.safe_load(fs.cat_file(f"{out}/manifest.json"))
    assert manifest["counts"]["input_rows"] == 40 == manifest["counts"]["result_rows"]
    assert len(manifest["input_files"]) == 3 and manifest["versions"]["ray"]
    from fengshen_batch.model.source import model_version

    # the version of the bucket's model every replica loaded (issue 32, case 5)
    assert manifest["model_versions"] == {
        "s3://corpus/models/tiny/": model_version("s3://corpus/models/tiny/", s3_options)
    }
    # no secret anywhere the job wrote or printed
    written = b"".join(fs.cat_file(p) for p in fs.find(out))
    assert PLANTED_SECRET.encode() not in written
    assert PLANTED_SECRET not in proc.stdout + proc.stderr
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    for log in (session / "logs").rglob("*"):
        if log.is_file():
            assert PLANTED_SECRET.encode() not in log.read_bytes(), log


def test_local_generate_job_equals_the_engine(tmp_path, replica):
    """Two actors, each with several batches in flight into one engine; per-row limits from the `n` column
    (0 is a bad limit: that row goes to errors/ and the job goes on)."""
    (tmp_path / "in").mkdir()
    rows = write_inputs(lambda name, t: pq.write_table(t, tmp_path / "in" / name), files=(7, 6))
    spec = build_spec({
        "kind": "generate", "model": str(replica.source), "input": str(tmp_path / "in"),
        "output": str(tmp_path / "out"), "prompt_column": "text", "actors": 2, "max_new_tokens": 6,
        "num_return_sequences": 2, "seed": 11, "temperature": 0.8, "shard_rows": 4, "batch_size": 3,
        "max_new_tokens_column": "n", "max_num_seqs": 4, "max_concurrent_batches": 3,
    })  # fmt: skip
    manifest = run_job(spec, progress=lambda _: None)
    assert (tmp_path / "out" / "_SUCCESS").exists()
    assert manifest["counts"]["input_rows"] == 13 and manifest["counts"]["result_rows"] == 22
    assert manifest["counts"]["error_rows"] == 2
    assert (
        0
        < manifest["startup"]["first_batch"]
        < manifest["startup"]["first_shard"]
        <= manifest["wall_seconds"]
    )
    errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert {e["error_kind"] for e in errors} == {"bad_max_new_tokens"} and {e["n"] for e in errors} == {0}
    table = pq.read_table(tmp_path / "out" / "data").sort_by(
        [("id", "ascending"), ("sample_index", "ascending")]
    )
    good = sorted(i for i in rows if rows[i]["n"] > 0)
    assert collections.Counter(table.column("id").to_pylist()) == {i: 2 for i in good}
    expected = generate(
        replica, [rows[i]["text"] for i in good], good, spec.params(), [rows[i]["n"] for i in good]
    )
    for i, samples in zip(good, expected, strict=True):
        got = [r for r in table.to_pylist() if r["id"] == i]
        assert [(g["sample_index"], g["generation"], g["generated_tokens"]) for g in got] == [
            (s.sample_index, s.generation, s.generated_tokens) for s in samples
        ]
        assert all(g["generated_tokens"] <= rows[i]["n"] for g in got)
        assert got[0]["source"] == rows[i]["source"]


def test_spec_file_equals_cli_options(tmp_path, replica):
    (tmp_path / "in").mkdir()
    write_inputs(lambda name, t: pq.write_table(t, tmp_path / "in" / name), files=(5, 4))
    common = {"model": str(replica.source), "input": str(tmp_path / "in"), "actors": 1, "stride": 16}
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(
        yaml.safe_dump({"kind": "score", "name": "nightly", **common, "output": str(tmp_path / "a")})
    )
    runner = CliRunner()
    res = runner.invoke(main, ["run", str(spec_path)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, [
        "score", "--model", common["model"], "--input", common["input"], "--actors", "1", "--stride", "16",
        "--output", str(tmp_path / "b"),
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    a, b = (pq.read_table(tmp_path / d / "data").sort_by("id") for d in ("a", "b"))
    assert a.equals(b)
    assert a.num_rows == 9


def test_output_schema_is_stable_when_every_row_fails(tmp_path, replica):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": ["", None, ""], "k": [1, 2, 3]}), tmp_path / "in" / "bad.parquet")
    pq.write_table(pa.table({"text": ["北京", "ok"], "k": [4, 5]}), tmp_path / "in" / "good.parquet")
    spec = build_spec({"kind": "score", "model": str(replica.source), "input": str(tmp_path / "in"),
                       "output": str(tmp_path / "out"), "actors": 1})  # fmt: skip
    manifest = run_job(spec, progress=lambda _: None)
    assert manifest["counts"] == {
        "input_rows": 5,
        "result_rows": 2,
        "error_rows": 3,
        "error_kinds": {"empty_text": 2, "null_text": 1},
        "tokens": manifest["counts"]["tokens"],
    }
    parts = sorted((tmp_path / "out" / "data").iterdir())
    schemas = {pq.read_schema(p) for p in parts}
    assert len(parts) == 2 and len(schemas) == 1  # the all-failed shard has the same schema, zero rows
    errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert sorted((e["id"], e["error_kind"]) for e in errors) == [
        ("bad.parquet:0", "empty_text"), ("bad.parquet:1", "null_text"), ("bad.parquet:2", "empty_text"),
    ]  # fmt: skip
    assert {e["k"] for e in errors} == {1, 2, 3}


def test_rerun_of_a_finished_job_is_a_no_op(tmp_path, replica):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"text": ["a b c", "北京"]}), tmp_path / "in" / "x.parquet")
    fields = {"kind": "score", "model": str(replica.source), "input": str(tmp_path / "in"),
              "output": str(tmp_path / "out")}  # fmt: skip
    run_job(build_spec(fields), progress=lambda _: None)
    before = (tmp_path / "out" / "manifest.json").read_text()
    messages = []
    assert run_job(build_spec(fields), progress=messages.append) == {"status": "already_complete"}
    assert "already complete" in messages[0]
    assert (tmp_path / "out" / "manifest.json").read_text() == before
