"""Shard files written by the workers: whole or not at all, locally and on S3 (moto), readable as one table."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from fengshen_batch.io import writer
from fengshen_batch.io.inputs import Shard
from fengshen_batch.io.storage import StorageSpec, filesystem
from tests.helpers import make_bucket

WRITE_TABLE = pq.write_table
TABLE = pa.table({"id": ["a", "b"], "text": ["x" * 100_000, "y"], "ppl": [1.5, 2.5]})


def _half_then_fail(table, where, **kwargs):
    """pq.write_table that dies halfway: the bytes of a truncated Parquet file, then an error."""
    sink = pa.BufferOutputStream()
    WRITE_TABLE(table, sink)
    data = sink.getvalue().to_pybytes()
    if isinstance(where, str):
        with open(where, "wb") as f:
            f.write(data[: len(data) // 2])
    else:
        where.write(data[: len(data) // 2])
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_half_written_file_never_becomes_visible(tmp_path, s3_options, store, monkeypatch):
    if store == "s3":
        make_bucket(s3_options, "writer")
        url, storage = "s3://writer/out", StorageSpec(endpoint_url=s3_options["endpoint_url"])
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_options["key"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_options["secret"])
    else:
        url, storage = str(tmp_path / "out"), StorageSpec()
    fs, root = filesystem(url, storage)
    shard = Shard(7, "in.parquet", "in.parquet", 0, 2)
    empty = TABLE.schema.empty_table()

    monkeypatch.setattr(writer.pq, "write_table", _half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        writer.write_shard_files(url, storage, shard, TABLE, empty)
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/data/part-000007.parquet")
    assert [p for p in fs.find(root) if "part-000007" in p] == []  # no temporary file left behind either

    monkeypatch.undo()
    if store == "s3":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_options["key"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_options["secret"])
    writer.write_shard_files(url, storage, shard, TABLE, empty)
    writer.write_shard_files(url, storage, shard, TABLE, empty)  # a retry rewrites it whole: still one file
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{root}/data")) == ["part-000007.parquet"]
    table = ds.dataset(f"{root}/data", filesystem=fs, format="parquet").to_table()
    assert table.equals(TABLE)
