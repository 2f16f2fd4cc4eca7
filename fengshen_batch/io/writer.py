"""Write one shard's results where they are computed: the model actor, not the driver.

The actor that scored or generated a shard splits its rows into `data/` and `errors/` and writes both files
itself; the driver gets back only a small commit record (counts) and writes the shard's marker
(`outputs.py`). Rows, passthrough columns and texts never travel to the driver.

File names are deterministic (`part-000042.parquet`), and each file appears whole or not at all
(`storage.write_whole`: one completed upload on object stores; on a local disk a hidden temporary file in
the same folder, `.part-000042.parquet.tmp-*`, which pyarrow, Spark and Ray Data skip, renamed into place). A shard whose marker is missing is
redone on a rerun and its files rewritten whole, with the same content. We chose this over Hadoop's
`_temporary/` + rename because a rename on S3 is a server-side copy of every byte, and the commit would
wait for it; the cost is that a reader listing `data/` while a job runs can see a finished shard a moment
before its marker. Read an output once it has `_SUCCESS`.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .inputs import Shard
from .outputs import DATA, ERRORS, INTERNAL, SIGNATURES, ShardStats, part_name
from .portable import is_portable, write_portable
from .storage import StorageSpec, filesystem, join, write_whole


def split_results(
    shard: Shard,
    rows: pa.Table,
    tokens: Callable[[pa.Table], int],
    data_schema: pa.Schema,
    error_schema: pa.Schema,
    expected: int | None = None,
) -> tuple[pa.Table, pa.Table, ShardStats]:
    """A shard's model output (input columns, results, error columns) -> (data, errors, stats); `tokens`
    counts the tokens of its good rows (the kind's `tokens`); `expected`: the rows it read (its range's
    unless it is one route's share of them)."""
    failed = pc.is_valid(rows.column("error_kind"))
    good, bad = rows.filter(pc.invert(failed)), rows.filter(failed)
    expected = shard.stop - shard.start if expected is None else expected
    good_rows = len(pc.unique(good.column("_row"))) if len(good) else 0
    if good_rows + len(bad) != expected or set(good.column("_row").to_pylist()) & set(
        bad.column("_row").to_pylist()
    ):
        raise RuntimeError(f"shard {shard.index}: {good_rows} results + {len(bad)} errors != {expected} rows")
    good = good.sort_by("_row").drop_columns([*INTERNAL, "error_kind", "error_message"])
    bad = bad.sort_by("_row").drop_columns(INTERNAL)
    kinds = (
        {c["values"]: c["counts"] for c in pc.value_counts(bad.column("error_kind")).to_pylist()}
        if len(bad)
        else {}
    )
    stats = ShardStats(expected, len(good), len(bad), tokens(good), kinds)
    data = good.select(data_schema.names).cast(data_schema)
    errors = bad.select(error_schema.names).cast(error_schema)
    return data, errors, stats


def write_shard_files(output_url: str, storage: StorageSpec, shard: Shard, data: pa.Table, errors: pa.Table,
                      signatures: pa.Table | None = None):  # fmt: skip
    """The shard's data and error files under `output_url` (both written, even when empty), and its data
    rows' signatures (dedup jobs)."""
    fs, root = filesystem(output_url, storage)
    name = part_name(shard.index)
    files = [(DATA, data), (ERRORS, errors)] + ([(SIGNATURES, signatures)] if signatures is not None else [])
    for folder, table in files:
        fs.makedirs(join(root, folder), exist_ok=True)
        write_whole(fs, join(root, folder, f"{name}.parquet"), lambda f, t=table: write_portable(t, f))


def make_portable(
    output_url: str, storage: StorageSpec, paths: list[str], expected: dict[str, pa.Schema]
) -> int:
    """Rewrite, whole, the files among `paths` that an older version wrote in a form Spark refuses
    (nanosecond timestamps, unsigned integers), with their columns cast to the types this version writes
    (`expected`: by folder, data or errors), so a resumed output reads as one; return how many changed."""
    from concurrent.futures import ThreadPoolExecutor

    fs, _ = filesystem(output_url, storage)

    def one(path: str) -> int:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            if is_portable(pf.schema):
                return 0
            table = pf.read()
        want = expected[path.rsplit("/", 2)[-2]]
        types = {f.name: f.type for f in want}
        table = table.cast(pa.schema([f.with_type(types.get(f.name, f.type)) for f in table.schema]))
        write_whole(fs, path, lambda f: write_portable(table, f))
        return 1

    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(one, paths))
