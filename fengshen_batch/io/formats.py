"""Input file formats: Parquet, read by its footer and row groups; JSON Lines and CSV, which have no footer,
read whole (their row count and column types are known only after parsing a file: the checks before Ray
starts parse each one once, and a shard reads its file and keeps its rows). One format per input. Types
are pyarrow's inference (`pyarrow.json`, `pyarrow.csv`): a JSON string is a string, a number an int64 or
double, a missing key or `null` a null; a CSV cell that parses as a number is one, so a numeric-looking id
column of a CSV is int64 (ids may be strings or whole numbers). `.gz` files are decompressed."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError

EXTENSIONS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "json", ".ndjson": "json", ".json": "json",
              ".csv": "csv"}  # fmt: skip
NAMES = {"parquet": "Parquet file", "json": "JSON Lines file", "csv": "CSV file"}


def format_of(path: str) -> str | None:
    """The input format a file's name says, or None (not an input file)."""
    name = path.lower().removesuffix(".gz")
    ext = name[name.rfind(".") :] if "." in name.rsplit("/", 1)[-1] else ""
    fmt = EXTENSIONS.get(ext)
    return None if fmt == "parquet" and path.lower().endswith(".gz") else fmt


@dataclass(frozen=True)
class FileMeta:
    schema: pa.Schema  # the file's columns, no metadata
    rows: int
    parquet_schema: pq.ParquetSchema | None = None  # Parquet's own (INT96 columns are marked from it)


def _parse(fs, path: str, fmt: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    with fs.open(path, "rb", compression="infer") as f:
        return pajson.read_json(f) if fmt == "json" else pacsv.read_csv(f)


def read_meta(fs, path: str, fmt: str) -> FileMeta:
    """Columns and row count of one input file; an unreadable file is an InputError naming it."""
    try:
        if fmt == "parquet":
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
            return FileMeta(meta.schema.to_arrow_schema().remove_metadata(), meta.num_rows, meta.schema)
        table = _parse(fs, path, fmt)
        return FileMeta(table.schema.remove_metadata(), table.num_rows)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"cannot read {NAMES[fmt]} {fs.unstrip_protocol(path)}: {first}") from None


def read_rows(
    fs, path: str, fmt: str, start: int, stop: int, drop: tuple[str, ...], only: list[str] | None = None
) -> pa.Table:
    """Rows start..stop-1 of one input file, less the `drop` columns (or `only` these columns)."""
    if fmt != "parquet":
        table = _parse(fs, path, fmt).slice(start, stop - start)
        return (
            table.select(only) if only else table.drop_columns([c for c in drop if c in table.column_names])
        )
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        columns = only or ([c for c in pf.schema_arrow.names if c not in drop] if drop else None)
        groups, first, offset = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset < stop and offset + n > start:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        if groups:
            return pf.read_row_groups(groups, columns=columns).slice(start - first, stop - start)
        table = pf.schema_arrow.empty_table()  # an empty shard (an input of only empty files)
        return table.select(columns) if columns else table
