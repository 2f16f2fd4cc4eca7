"""Nothing lost under operator mistakes (issue 32, first step): an output that holds the input, or that another
tool wrote, is refused before anything starts, with --overwrite or without, and nothing in it is touched."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from fengshen_batch.cli import main
from fengshen_batch.job.run import run_job
from fengshen_batch.spec import build_spec
from tests.helpers import file_tree, write_texts


def _cli(args):
    return CliRunner().invoke(main, args)


def _spark_corpus(root: Path) -> None:
    """What Spark leaves: part files, a _SUCCESS and .crc files."""
    (root / "data").mkdir(parents=True)
    pq.write_table(
        pa.table({"id": ["a", "b"], "text": ["北京", "Aspirin"]}), root / "data" / "part-00000.parquet"
    )
    (root / "data" / "_SUCCESS").write_bytes(b"")
    (root / "data" / ".part-00000.parquet.crc").write_bytes(b"crc")


def test_an_output_that_holds_the_input_is_refused_and_the_input_kept(tmp_path, replica):
    corpus = tmp_path / "corpus"
    _spark_corpus(corpus)
    before = file_tree(corpus)
    for extra in (["--overwrite"], []):
        res = _cli(["score", "--model", str(replica.source), "--input", str(corpus / "data"),
                    "--output", str(corpus), *extra])  # fmt: skip
        assert res.exit_code == 2, res.output
        assert "is inside the output" in res.output and "Traceback" not in res.output
        assert file_tree(corpus) == before  # the corpus untouched


def test_another_tools_folder_is_neither_overwritten_nor_written_into(tmp_path, replica):
    inputs = tmp_path / "in"
    _spark_corpus(inputs)
    other = tmp_path / "other"  # another tool's finished output
    other.mkdir()
    (other / "_SUCCESS").write_bytes(b"")
    (other / "manifest.json").write_text('{"tool": "something else"}')
    pq.write_table(pa.table({"x": [1]}), other / "part-00000.parquet")
    before = file_tree(other)
    for extra in (["--overwrite"], []):
        res = _cli(["score", "--model", str(replica.source), "--input", str(inputs / "data"),
                    "--output", str(other), *extra])  # fmt: skip
        assert res.exit_code == 2, res.output
        assert "part-00000.parquet" in res.output and "not one of this tool's outputs" in res.output
        assert ("--overwrite deletes only those" in res.output) == bool(extra)
        assert file_tree(other) == before
    # a folder holding only another tool's _SUCCESS (an empty Spark write): named, not a traceback
    empty = tmp_path / "empty_spark"
    empty.mkdir()
    (empty / "_SUCCESS").write_bytes(b"")
    res = _cli(
        ["score", "--model", str(replica.source), "--input", str(inputs / "data"), "--output", str(empty)]
    )
    assert res.exit_code == 2 and "_SUCCESS without a fengshen-batch manifest.json" in res.output, res.output
    assert file_tree(empty) == {"_SUCCESS": b""}


@pytest.mark.usefixtures("ray_cluster")
def test_overwrite_replaces_only_the_shard_files_and_keeps_what_a_user_put_beside_them(tmp_path, replica):
    write_texts(tmp_path / "in", files=(5, 4))
    base = {"kind": "score", "model": str(replica.source), "input": str(tmp_path / "in"),
            "output": str(tmp_path / "out"), "shard_rows": 3}  # fmt: skip
    run_job(build_spec(base), progress=lambda _: None)
    notes = tmp_path / "out" / "data" / "notes"  # a user's own files inside our data/
    notes.mkdir()
    (notes / "readme.txt").write_text("kept")
    (tmp_path / "out" / "data" / "LICENSE").write_text("kept too")
    old = json.loads((tmp_path / "out" / "manifest.json").read_text())
    new = run_job(
        build_spec({**base, "bucket_thresholds": [100, 1000]}), progress=lambda _: None, overwrite=True
    )
    assert new["spec_hash"] != old["spec_hash"]
    assert (notes / "readme.txt").read_text() == "kept" and (tmp_path / "out" / "data" / "LICENSE").exists()
    parts = sorted(p.name for p in (tmp_path / "out" / "data").glob("part-*.parquet"))
    assert parts == [f"part-{i:06d}.parquet" for i in range(new["shards"])]
    table = pq.read_table([tmp_path / "out" / "data" / p for p in parts])
    assert table.num_rows == 9 and "bucket" in table.column_names
    assert not (tmp_path / "out" / "_overwrite").exists()


def test_max_new_tokens_at_the_models_context_is_refused_before_it_loads(tmp_path, replica):
    inputs = tmp_path / "in"
    _spark_corpus(inputs)
    context = json.loads((Path(replica.source) / "config.json").read_text())["n_positions"]
    res = _cli(["generate", "--model", str(replica.source), "--input", str(inputs / "data"), "--prompt-column",
                "text", "--output", str(tmp_path / "out"), "--max-new-tokens", str(context)])  # fmt: skip
    assert res.exit_code == 2, res.output
    assert f"max_new_tokens={context} leaves no room for a prompt" in res.output
    assert f"give at most {context - 1}" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_an_id_column_of_lists_is_refused_before_anything_starts(tmp_path, replica):
    (tmp_path / "in").mkdir()
    pq.write_table(
        pa.table({"id": [["a"], ["b"]], "text": ["北京", "Aspirin"]}), tmp_path / "in" / "a.parquet"
    )
    res = _cli(["score", "--model", str(replica.source), "--input", str(tmp_path / "in"),
                "--output", str(tmp_path / "out")])  # fmt: skip
    assert res.exit_code == 2 and "id column 'id' is list<element: string>" in res.output, res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize("kind", ["score", "generate"])
def test_an_empty_night_publishes_an_empty_valid_output_with_its_report(tmp_path, replica, kind):
    """A drop of only zero-row files (an empty nightly partition) is a finished job, not a red night."""
    (tmp_path / "in").mkdir()
    for name in ("a.parquet", "b.parquet"):
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "in" / name)
    out = tmp_path / "out"
    extra = ["--prompt-column", "text", "--max-new-tokens", "4"] if kind == "generate" else []
    res = _cli([kind, "--model", str(replica.source), "--input", str(tmp_path / "in"), "--output", str(out),
                *extra])  # fmt: skip
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["input_rows"] == 0 == manifest["counts"]["result_rows"]
    assert (out / "_SUCCESS").exists() and (out / "report" / "report.html").exists()
    table = pq.read_table(out / "data")
    result = "ppl" if kind == "score" else "generation"
    assert table.num_rows == 0 and result in table.column_names and "text" in table.column_names
    assert "already complete" in _cli([kind, "--model", str(replica.source), "--input", str(tmp_path / "in"),
                                       "--output", str(out), *extra]).output  # fmt: skip


@pytest.mark.parametrize(
    "column, first, later",
    [
        (
            "text",
            pa.array(["北京", "Aspirin"]),
            pa.array([b"\x89PNG", b"x"], pa.binary()),
        ),  # binary text later
        ("id", pa.array(["a", "b"]), pa.array([1, 2])),  # string ids, then int ids
        ("note", pa.array([None, None], pa.null()), pa.array(["x", "y"])),  # pandas' all-null column
    ],
)
def test_a_column_whose_type_changes_between_files_is_refused_naming_both(
    tmp_path, replica, column, first, later
):
    (tmp_path / "in").mkdir()
    base = {"id": pa.array(["a", "b"]), "text": pa.array(["北京", "Aspirin"]), "note": pa.array(["n", "m"])}
    pq.write_table(pa.table({**base, column: first}), tmp_path / "in" / "a.parquet")
    pq.write_table(
        pa.table({**base, "id": pa.array(["c", "d"]), column: later}), tmp_path / "in" / "b.parquet"
    )
    res = _cli(["score", "--model", str(replica.source), "--input", str(tmp_path / "in"),
                "--output", str(tmp_path / "out")])  # fmt: skip
    assert res.exit_code == 2, res.output
    assert f"column {column!r} is {later.type}" in res.output and "b.parquet" in res.output
    assert "a.parquet" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()
