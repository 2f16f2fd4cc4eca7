"""Nothing lost under operator mistakes (issue 32, first step): an output that holds the input, or that another
tool wrote, is refused before anything starts, with --overwrite or without, and nothing in it is touched."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from click.testing import CliRunner

from fengshen_batch.cli import main


def _cli(args):
    return CliRunner().invoke(main, args)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


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
    before = _tree(corpus)
    for extra in (["--overwrite"], []):
        res = _cli(["score", "--model", str(replica.source), "--input", str(corpus / "data"),
                    "--output", str(corpus), *extra])  # fmt: skip
        assert res.exit_code == 2, res.output
        assert "is inside the output" in res.output and "Traceback" not in res.output
        assert _tree(corpus) == before  # the corpus untouched


def test_another_tools_folder_is_neither_overwritten_nor_written_into(tmp_path, replica):
    inputs = tmp_path / "in"
    _spark_corpus(inputs)
    other = tmp_path / "other"  # another tool's finished output
    other.mkdir()
    (other / "_SUCCESS").write_bytes(b"")
    (other / "manifest.json").write_text('{"tool": "something else"}')
    pq.write_table(pa.table({"x": [1]}), other / "part-00000.parquet")
    before = _tree(other)
    for extra in (["--overwrite"], []):
        res = _cli(["score", "--model", str(replica.source), "--input", str(inputs / "data"),
                    "--output", str(other), *extra])  # fmt: skip
        assert res.exit_code == 2, res.output
        assert "part-00000.parquet" in res.output and "not one of this tool's outputs" in res.output
        assert ("--overwrite deletes only those" in res.output) == bool(extra)
        assert _tree(other) == before
    # a folder holding only another tool's _SUCCESS (an empty Spark write): named, not a traceback
    empty = tmp_path / "empty_spark"
    empty.mkdir()
    (empty / "_SUCCESS").write_bytes(b"")
    res = _cli(
        ["score", "--model", str(replica.source), "--input", str(inputs / "data"), "--output", str(empty)]
    )
    assert res.exit_code == 2 and "_SUCCESS without a fengshen-batch manifest.json" in res.output, res.output
    assert _tree(empty) == {"_SUCCESS": b""}
