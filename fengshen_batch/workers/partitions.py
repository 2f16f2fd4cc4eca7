"""What the hash-partitioned Ray tasks share (near-duplicates in `dedup.py`, the reuse lookup in
`reuse.py`): a file's columns read where the task runs, a table split by each row's partition, and the
tasks themselves with their options."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ..io.storage import filesystem


def read_columns(url: str, storage, path: str, columns: list[str]) -> pa.Table:
    """These columns of one Parquet file under the output (or input) at `url`."""
    fs, _ = filesystem(url, storage)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def split(table: pa.Table, part: np.ndarray, n: int) -> list[pa.Table]:
    """`table`'s rows in n tables by `part` (each row's partition), each in the rows' order."""
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(n + 1))
    return [table.take(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def returns(tables: list):
    """A task's return values: a task of one return value returns it bare."""
    return tables if len(tables) > 1 else tables[0]


def remote(fn, options: dict, **more):
    """`fn` as a Ray task with these options (ray.remote takes no empty parentheses)."""
    merged = {**options, **more}
    return ray.remote(**merged)(fn) if merged else ray.remote(fn)
