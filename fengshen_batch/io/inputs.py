"""Input files: find them, check them (Parquet from their footers; JSON Lines and CSV parsed once, see
`formats.py`), and cut them into deterministic shards.

Everything here runs on the driver before Ray starts or a model loads, reading only Parquet footers, so a
missing path, an empty folder, a corrupt file or a missing text column fails the job at once with a line
that names it. Shards (file x row range) are the same on every run: they name the output files and the
completion markers that make reruns resume.
"""

from __future__ import annotations

import posixpath
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from ..errors import InputError
from .formats import NAMES, format_of, read_meta, read_rows
from .portable import mark_int96
from .redact import redact_url
from .storage import StorageSpec, filesystem

ID_COLUMN = "id"
# Columns the job adds; an input column of the same name would be ambiguous.
RESERVED = {"_shard", "_row", "error_kind", "error_message"}


HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"  # Hive's and Spark's directory name for a null partition value


@dataclass(frozen=True)
class InputFile:
    url: str  # full URL (or local path) to open
    name: str  # path relative to the input root: the stable part of derived row ids
    rows: int
    partitions: tuple[tuple[str, str | None], ...] = ()  # hive `key=value` folders above the file
    version: str = ""  # size and ETag (or mtime) when listed: a rerun tells a changed file by it


@dataclass(frozen=True)
class Shard:
    index: int
    url: str
    name: str
    start: int  # first row in the file
    stop: int  # one past the last row
    partitions: tuple[tuple[str, str | None], ...] = ()
    version: str = ""  # its file's (InputFile.version)
    # Rows routed by their prompt's header (few-shot sets): this shard holds the rows of its range whose
    # route is `route` of `routes`, and runs on that route's replicas (workers.pools). 0 of 1: every row.
    route: int = 0
    routes: int = 1

    @property
    def planned_rows(self) -> float:
        """Rows it is expected to hold: its range's, split evenly among the routes (what the display counts
        before the shard is read)."""
        return (self.stop - self.start) / self.routes

    def __post_init__(self):  # after a trip through Arrow (Ray Data) the pairs come back as lists
        object.__setattr__(self, "partitions", tuple(tuple(p) for p in self.partitions))


@dataclass(frozen=True)
class Inputs:
    files: list[InputFile]
    schema: pa.Schema  # input columns (with `id`) as they appear in the output
    id_column: str | None  # None: ids derived from file name and row index

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)


def file_version(info: dict) -> str:
    """What tells this version of a file from another: its size and the store's ETag (S3), generation (GCS) or
    modification time (local, HDFS)."""
    tag = next(
        (info[k] for k in ("ETag", "etag", "generation", "mtime", "LastModified", "updated") if info.get(k)),
        "",
    )
    return f"{info.get('size')}:{str(tag).strip(chr(34))}"


def _list(url: str, storage: StorageSpec) -> tuple[list[str], str, object, dict[str, dict]]:
    fs, path = filesystem(url, storage)
    fs.invalidate_cache()  # fsspec keeps one instance per options, with its listings: list afresh
    try:
        if any(c in path for c in "*?["):
            root = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
            infos = fs.glob(path, detail=True)
        elif fs.isdir(path):
            root, infos = path, fs.find(path, detail=True)
        elif fs.isfile(path):
            root, infos = posixpath.dirname(path), {path: fs.info(path)}
        else:
            raise InputError(f"input not found: {redact_url(url)}")
    except InputError:
        raise
    except Exception as e:  # unreachable endpoint, refused credentials: say which, never the secret
        raise InputError(f"cannot list input {redact_url(url)}: {type(e).__name__}: {e}") from None
    paths = sorted(p for p in infos if format_of(p) and "/_" not in p.removeprefix(root))
    if not paths:
        raise InputError(
            f"no Parquet, JSON Lines or CSV files (*.parquet, *.jsonl, *.csv) under input {redact_url(url)}"
        )
    formats = sorted({format_of(p) for p in paths})
    if len(formats) > 1:
        raise InputError(
            f"input {redact_url(url)} mixes {' and '.join(NAMES[f] + 's' for f in formats)}: one format per input"
        )
    return paths, root, fs, infos


def _is_text(t: pa.DataType) -> bool:
    """A string column, or one dictionary-encoded (pandas `category`, some Spark writers): both read as str."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _same_kind(a: pa.DataType, b: pa.DataType) -> bool:
    """Types that read as the same column: equal, or both text (string, large_string, dictionary of them)."""
    return a == b or (_is_text(a) and _is_text(b))


def _hive_partitions(rel: str) -> tuple[tuple[str, str | None], ...]:
    """The `key=value` folders of a file's path below the input root, as pyarrow's and Ray Data's hive
    partitioning reads them (values URL-decoded; Hive's default partition is null)."""
    pairs = []
    for folder in rel.split("/")[:-1]:
        if "=" in folder:
            key, value = folder.split("=", 1)
            value = urllib.parse.unquote(value)
            pairs.append((urllib.parse.unquote(key), None if value == HIVE_NULL else value))
    return tuple(pairs)


def check_columns(schema: pa.Schema, strings, lists, others, numbers=()) -> None:
    names = ", ".join(schema.names)
    for column in [*strings, *lists, *others, *numbers]:
        if column not in schema.names:
            kind = (
                "text " if column in strings else "list " if column in lists
                else "max_new_tokens " if column in numbers else ""
            )  # fmt: skip
            raise InputError(f"{kind}column {column!r} not in the input (columns: {names})")
    for column in numbers:
        t = schema.field(column).type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t)):
            raise InputError(f"max_new_tokens column {column!r} is {t}, not a column of whole numbers")
    for column in strings:
        t = schema.field(column).type
        if not _is_text(t):
            raise InputError(f"text column {column!r} is {t}, not a string column")
    for column in lists:
        t = schema.field(column).type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not (
            pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)
        ):
            raise InputError(f"column {column!r} is {t}, not a list of strings")


def inspect_inputs(
    url: str,
    storage: StorageSpec,
    text_column: str | None,
    id_column: str | None,
    list_columns: tuple[str, ...] = (),
    other_columns: tuple[str, ...] = (),
    number_columns: tuple[str, ...] = (),
    drop_columns: tuple[str, ...] = (),
) -> Inputs:
    """List and check the input files; return them with their row counts and the common schema: the
    files' columns, less `drop_columns`, then any hive partition keys (as strings) of their folders."""
    paths, root, fs, infos = _list(url, storage)
    fmt = format_of(paths[0])
    kind = NAMES[fmt]
    with ThreadPoolExecutor(16) as pool:
        footers = list(pool.map(lambda p: read_meta(fs, p, fmt), paths))
    # INT96 columns (Spark's default timestamps) are UTC instants: marked so, they are written back as such
    first = footers[0].schema
    schema = mark_int96(first, footers[0].parquet_schema) if footers[0].parquet_schema else first
    for path, meta in zip(paths, footers, strict=True):
        other = meta.schema
        if other.names != schema.names:
            raise InputError(
                f"{kind} {fs.unstrip_protocol(path)} has columns {other.names}, "
                f"the first file has {schema.names}: all input files need the same columns"
            )
        for a, b in zip(first, other, strict=True):
            if not _same_kind(a.type, b.type):
                raise InputError(
                    f"column {a.name!r} is {b.type} in {kind} {fs.unstrip_protocol(path)} but {a.type} in "
                    f"the first file ({fs.unstrip_protocol(paths[0])}): all input files need one type per "
                    "column (pandas: give the column a dtype; an all-null column is written as null)"
                )
    rels = [posixpath.relpath(p, root) if root else p for p in paths]
    partitions = [_hive_partitions(rel) for rel in rels]
    keys = [k for k, _ in partitions[0]]
    for path, parts in zip(paths, partitions, strict=True):
        if [k for k, _ in parts] != keys:
            raise InputError(
                f"{kind} {fs.unstrip_protocol(path)} has partition folders {[k for k, _ in parts]}, the "
                f"first file has {keys}: all input files need the same key=value folders"
            )
    for key in keys:
        if key in schema.names:
            raise InputError(f"partition key {key!r} is also a column of the files")
        schema = schema.append(pa.field(key, pa.string()))
    needed = [c for c in [text_column, id_column, *list_columns, *other_columns, *number_columns] if c]
    for column in drop_columns:
        if column not in schema.names:
            raise InputError(
                f"drop_columns: {column!r} is not an input column (columns: {', '.join(schema.names)})"
            )
        if column in needed:
            raise InputError(f"drop_columns: {column!r} is a column this job reads")
        schema = schema.remove(schema.get_field_index(column))
    check_columns(schema, [text_column] if text_column else [], list_columns, other_columns, number_columns)
    if id_column is not None and id_column not in schema.names:
        raise InputError(f"id column {id_column!r} not in the input (columns: {', '.join(schema.names)})")
    if id_column is None and ID_COLUMN in schema.names:
        id_column = ID_COLUMN
    if id_column is not None:
        t = schema.field(id_column).type
        if not (_is_text(t) or pa.types.is_integer(t)):
            raise InputError(f"id column {id_column!r} is {t}: row ids must be strings or whole numbers")
    clash = RESERVED & set(schema.names)
    if clash:
        raise InputError(f"input columns {sorted(clash)} are reserved for the job's own columns")
    if id_column is None:
        schema = schema.insert(0, pa.field(ID_COLUMN, pa.string()))
    files = [
        InputFile(fs.unstrip_protocol(p), rel, meta.rows, parts, file_version(infos[p]))
        for p, rel, meta, parts in zip(paths, rels, footers, partitions, strict=True)
    ]
    return Inputs(files, schema, id_column)


def make_shards(files: list[InputFile], shard_rows: int, routes: int = 1) -> list[Shard]:
    """Each file cut into ranges of `shard_rows`, each range one shard per route; an input of only empty
    files (an empty nightly drop) gets one empty shard, so that its output is published like any other:
    empty files, a manifest, a report."""
    shards = []
    for f in files:
        for start in range(0, f.rows, shard_rows):
            stop = min(start + shard_rows, f.rows)
            for route in range(routes):
                shards.append(
                    Shard(len(shards), f.url, f.name, start, stop, f.partitions, f.version, route, routes)
                )
    if not shards:
        f = files[0]
        shards.append(Shard(0, f.url, f.name, 0, 0, f.partitions, f.version))
    return shards


def read_shard(
    shard: Shard, storage: StorageSpec, id_column: str | None, drop: tuple[str, ...] = ()
) -> pa.Table:
    """The shard's rows (less the `drop` columns, plus its partition keys), with `id` (derived where the
    input has none), `_shard` and `_row` columns added."""
    fs, path = filesystem(shard.url, storage)
    table = read_rows(fs, path, format_of(path) or "parquet", shard.start, shard.stop, drop)
    table = table.replace_schema_metadata(None)
    for key, value in shard.partitions:
        if key not in drop:
            table = table.append_column(key, pa.array([value] * len(table), pa.string()))
    rows = pa.array(range(shard.start, shard.stop), pa.int64())
    if id_column is None:
        table = table.add_column(0, ID_COLUMN, pa.array([f"{shard.name}:{r}" for r in rows.to_pylist()]))
    table = table.append_column("_shard", pa.array([shard.index] * len(table), pa.int64()))
    return table.append_column("_row", rows)
