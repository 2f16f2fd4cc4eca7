"""CCNet's split of a scored corpus by perplexity into head, middle and tail: the bucket of each row (cut from
fixed thresholds at write time, or from the corpus's quantiles after the last shard, by rewriting each data
file whole) and rows per bucket."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..io.outputs import sum_counts
from ..io.portable import write_portable
from ..io.storage import StorageSpec, filesystem, write_whole

BUCKETS = ("head", "middle", "tail")  # CCNet's split by perplexity: head <= c0 < middle <= c1 < tail


def bucket_column(values: pa.ChunkedArray | pa.Array, cutoffs: list[float]) -> pa.Array:
    idx = np.searchsorted(np.asarray(cutoffs), np.asarray(values), side="left")
    return pa.array(np.asarray(BUCKETS, dtype=object)[idx], pa.string())


def bucket_counts(bucket: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    """Rows per bucket, every bucket named (0 where empty)."""
    counts = {c["values"]: c["counts"] for c in pc.value_counts(bucket).to_pylist()}
    return {b: counts.get(b, 0) for b in BUCKETS}


def with_buckets(
    data: pa.Table, cutoffs: list[float], column: str = "ppl", bucket: str = "bucket"
) -> pa.Table:
    """`data` with its bucket column (named `bucket`) cut from `column` (replaced if there is one)."""
    if bucket in data.column_names:
        data = data.drop_columns([bucket])
    return data.append_column(bucket, bucket_column(data.column(column), cutoffs))


def rebucket_file(
    output_url: str, storage: StorageSpec, path: str, cutoffs: list[float], column: str, bucket: str
) -> dict[str, int]:
    """Rewrite one data file whole with its bucket column (quantile cutoffs are known only after the last
    shard); return its rows per bucket."""
    fs, _ = filesystem(output_url, storage)
    with fs.open(path, "rb") as f:
        table = with_buckets(pq.read_table(f), cutoffs, column, bucket)
    write_whole(fs, path, lambda f: write_portable(table, f))
    return bucket_counts(table.column(bucket))


def rebucket_files(
    output_url: str, storage: StorageSpec, paths: list[str], cutoffs: list[float], column: str, bucket: str
) -> dict[str, int]:
    """`rebucket_file` on each of `paths` (4 at a time: pyarrow and the object store release the GIL);
    the rows per bucket of all of them."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        return sum_counts(
            pool.map(lambda p: rebucket_file(output_url, storage, p, cutoffs, column, bucket), paths)
        )
