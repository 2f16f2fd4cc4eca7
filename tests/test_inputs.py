"""Input discovery and sharding: a file, a folder and a glob; deterministic shards and ids."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from fengshen_batch.io.inputs import inspect_inputs, make_shards, read_shard
from fengshen_batch.io.storage import StorageSpec


def _files(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["a", "b", "c"]}), tmp_path / "in" / "x.parquet", row_group_size=2)
    pq.write_table(pa.table({"text": ["d", "e"]}), tmp_path / "in" / "sub" / "y.parquet")
    (tmp_path / "in" / "_SUCCESS").write_text("")  # markers and other non-Parquet files are ignored


def test_file_folder_and_glob(tmp_path):
    _files(tmp_path)
    storage = StorageSpec()
    folder = inspect_inputs(str(tmp_path / "in"), storage, "text", None)
    assert [(f.name, f.rows) for f in folder.files] == [("sub/y.parquet", 2), ("x.parquet", 3)]
    glob = inspect_inputs(str(tmp_path / "in" / "*.parquet"), storage, "text", None)
    assert [(f.name, f.rows) for f in glob.files] == [("x.parquet", 3)]
    single = inspect_inputs(str(tmp_path / "in" / "sub" / "y.parquet"), storage, "text", None)
    assert [(f.name, f.rows) for f in single.files] == [("y.parquet", 2)]
    assert folder.schema.names == ["id", "text"] and folder.id_column is None


def test_shards_cover_every_row_once_across_row_groups(tmp_path):
    _files(tmp_path)
    inputs = inspect_inputs(str(tmp_path / "in"), StorageSpec(), "text", None)
    shards = make_shards(inputs.files, shard_rows=2)
    assert make_shards(inputs.files, shard_rows=2) == shards  # deterministic
    rows = [r for s in shards for r in read_shard(s, StorageSpec(), None).to_pylist()]
    assert [(r["id"], r["text"]) for r in rows] == [
        ("sub/y.parquet:0", "d"), ("sub/y.parquet:1", "e"),
        ("x.parquet:0", "a"), ("x.parquet:1", "b"), ("x.parquet:2", "c"),
    ]  # fmt: skip
    assert [r["_shard"] for r in rows] == [0, 0, 1, 1, 2]


def test_a_file_rewritten_in_place_gets_a_new_version_locally_and_on_s3(tmp_path, s3_options, monkeypatch):
    """The identity a rerun compares (size and ETag on S3, size and mtime locally) changes when a file is
    rewritten with the same row count, and stays when nothing changed."""
    import s3fs

    from tests.helpers import make_bucket

    make_bucket(s3_options, "versions")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_options["secret"])
    fs = s3fs.S3FileSystem(**s3_options)
    local = tmp_path / "in" / "a.parquet"
    local.parent.mkdir()

    def write(texts):
        pq.write_table(pa.table({"text": texts}), local)
        fs.put(str(local), "versions/in/a.parquet")

    for url, storage in ((str(local.parent), StorageSpec()),
                         ("s3://versions/in", StorageSpec(endpoint_url=s3_options["endpoint_url"]))):  # fmt: skip
        write(["one", "two"])
        first = inspect_inputs(url, storage, "text", None).files[0].version
        assert first == inspect_inputs(url, storage, "text", None).files[0].version
        write(["three", "four and more"])  # no cache invalidated here: the listing must not reuse one
        assert inspect_inputs(url, storage, "text", None).files[0].version != first
