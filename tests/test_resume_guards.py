"""Issue 32, cases 2 and 4, through the CLI on a real local Ray: a rerun after the input changed upstream is
refused naming the files (or recomputes exactly what changed, on request), and a published output holds
exactly the files its manifest counts, whatever a crashed attempt left in data/ or errors/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from fengshen_batch.cli import main
from fengshen_batch.tiny_model import SAMPLE_LINES
from tests.helpers import file_tree

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _file(folder: Path, name: str, n: int, offset: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    texts = [SAMPLE_LINES[(i + offset) % len(SAMPLE_LINES)] * (1 + i % 3) for i in range(n)]
    pq.write_table(pa.table({"text": texts}), folder / name)


def _score(replica, inp: Path, out: Path, *extra: str):
    args = ["score", "--model", str(replica.source), "--input", str(inp), "--output", str(out),
            "--shard-rows", "3", *extra]  # fmt: skip
    return CliRunner().invoke(main, args)


def _results(out: Path) -> dict[str, float]:
    """{id: ppl} over every file a reader of data/ sees; an id twice fails."""
    table = pq.read_table(sorted((out / "data").glob("*.parquet")))
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an input row published twice"
    return dict(zip(ids, table.column("ppl").to_pylist(), strict=True))


def _crash_after_first_shard(out: Path) -> None:
    """What a driver killed after committing shard 0 leaves: no _SUCCESS or manifest, one marker, and the
    other shards' data and errors files written by the actors but never marked."""
    (out / "_SUCCESS").unlink()
    (out / "manifest.json").unlink()
    for marker in sorted((out / "_markers").glob("*.json"))[1:]:
        marker.unlink()


def test_a_file_that_appeared_upstream_is_named_not_resumed_over_then_recomputed_on_request(
    tmp_path, replica
):
    inp, out = tmp_path / "in", tmp_path / "out"
    _file(inp, "b.parquet", 5)
    _file(inp, "c.parquet", 4, offset=2)
    assert _score(replica, inp, out).exit_code == 0
    _crash_after_first_shard(out)
    _file(inp, "a.parquet", 2, offset=4)  # sorts first: every shard index moves by one
    before = file_tree(out)

    res = _score(replica, inp, out)
    assert res.exit_code == 2, res.output
    assert "a.parquet is new" in res.output and "--on-input-change recompute" in res.output
    assert "Traceback" not in res.output
    assert file_tree(out) == before  # refused before anything was written

    res = _score(replica, inp, out, "--on-input-change", "recompute")
    assert res.exit_code == 0, res.output
    assert "recomputing 1 of 1 committed shards" in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["input_rows"] == 11 == manifest["counts"]["result_rows"]
    fresh = tmp_path / "fresh"
    assert _score(replica, inp, fresh).exit_code == 0
    assert _results(out) == _results(fresh)  # each row once, the same values as a run from scratch
    assert sorted(p.name for p in (out / "data").iterdir()) == [f"part-{i:06d}.parquet" for i in range(5)]


def test_a_finished_output_whose_input_file_changed_is_not_already_complete(tmp_path, replica):
    inp, out = tmp_path / "in", tmp_path / "out"
    _file(inp, "b.parquet", 5)
    _file(inp, "c.parquet", 4)
    assert _score(replica, inp, out).exit_code == 0
    _file(inp, "c.parquet", 4, offset=3)  # the same rows, other texts: only its size and mtime tell

    res = _score(replica, inp, out)
    assert res.exit_code == 2 and "c.parquet changed" in res.output, res.output
    assert (out / "_SUCCESS").exists()  # the finished output still stands

    res = _score(replica, inp, out, "--on-input-change", "recompute")
    assert res.exit_code == 0, res.output
    assert "recomputing 2 of 4 committed shards" in res.output  # c's two shards; b's kept
    fresh = tmp_path / "fresh"
    assert _score(replica, inp, fresh).exit_code == 0
    assert _results(out) == _results(fresh)
    assert "already complete" in _score(replica, inp, out).output  # and now it is


def test_the_published_output_holds_exactly_the_files_its_manifest_counts(tmp_path, replica):
    inp, out = tmp_path / "in", tmp_path / "out"
    _file(inp, "b.parquet", 5)
    _file(inp, "c.parquet", 4)
    assert _score(replica, inp, out).exit_code == 0
    _crash_after_first_shard(out)
    # files no shard of this input names (an attempt over a longer input), and a committed shard's data lost
    for folder in ("data", "errors"):
        for stale in ("part-000007.parquet", "part-000011.parquet"):
            shutil.copy(out / folder / "part-000000.parquet", out / folder / stale)
    (out / "data" / "part-000000.parquet").unlink()

    res = _score(replica, inp, out)
    assert res.exit_code == 0, res.output
    assert "1 committed shard(s) lost their files" in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    parts = [f"part-{i:06d}" for i in range(4)]
    for folder, ext in (("data", "parquet"), ("errors", "parquet"), ("_markers", "json")):
        assert sorted(p.name for p in (out / folder).iterdir()) == [f"{p}.{ext}" for p in parts], folder
    results = _results(out)
    assert len(results) == manifest["counts"]["result_rows"] == 9
