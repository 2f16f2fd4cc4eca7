"""A score job's reuse lookup (`reuse:`): which of tonight's rows hold a text that an earlier output already
scored, found by a hash-partitioned join in Ray tasks, never on the driver, which only passes object
references along. The actors then take those rows' results from OUTPUT/_reuse/ instead of computing them.

    the earlier outputs' data files (content_key and result columns)
      -> earlier tasks (a slice of files each): their rows, hash-partitioned P ways by content key
    tonight's shards still to do (their text column only)
      -> key tasks (a slice of shards each): each row's content key, shard and row, P ways by key
      -> match tasks (one per partition): the first row of each key on the earlier side (the first listed
         output first), tonight's keys looked up in it; the matches split G ways by shard
      -> write tasks (one per shard group): OUTPUT/_reuse/part-NNNNNN.parquet for each shard with matches
         (`_row`, `_source`, the result columns), sorted by row

P grows with the earlier outputs (RESULT_BYTES_PER_PARTITION of their results per match task) and G with
tonight's rows, so every task holds a bounded share of the corpus whatever its size. Ray Data's join does
the same shuffle, but it repeats a key's rows on both sides (a text on k earlier rows and m of tonight's
gives k x m rows), where a match task keeps one earlier row per key before it joins.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from ..io.formats import format_of, read_rows
from ..io.outputs import REUSE, part_name
from ..io.storage import filesystem, write_whole
from ..kinds.rows import invalid_utf8
from ..kinds.score import content_digest
from .partitions import read_columns, remote, returns, split

FILES_PER_TASK = 16  # earlier data files read by one earlier task (4096 rows each at the default)
SHARDS_PER_TASK = 16  # tonight's shards keyed by one key task
RESULT_BYTES_PER_PARTITION = 16 * 2**20  # earlier rows (key, source, results) held by one match task
KEY = pa.binary(16)


def _keys(column) -> np.ndarray:
    """(N,) 'S16' view of a column of 16-byte keys (no nulls), for sorting and searching."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if not len(arr):
        return np.zeros(0, "S16")
    return np.frombuffer(arr.buffers()[1], "S16", count=len(arr), offset=arr.offset * 16)


def _key_array(keys: np.ndarray) -> pa.Array:
    """Arrow's fixed-size binary column of (N,) 'S16' keys (from their bytes: tolist would strip zeros)."""
    return pa.FixedSizeBinaryArray.from_buffers(KEY, len(keys), [None, pa.py_buffer(keys.tobytes())])


def _hex_keys(column: pa.ChunkedArray) -> np.ndarray:
    """(N,) 'S16' keys of a column of 32-hex-digit content keys (no nulls), decoded without a Python loop."""
    arr = column.combine_chunks().cast(pa.string())
    if not len(arr):
        return np.zeros(0, "S16")
    offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset : arr.offset + len(arr) + 1]
    if not (np.diff(offsets) == 32).all():
        raise ValueError("a content_key is not 32 hex digits: the output was not written by a score job")
    chars = (
        np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0] : offsets[-1]].reshape(-1, 32).astype(np.int16)
    )
    nibbles = np.where(chars >= ord("a"), chars - (ord("a") - 10), chars - ord("0")).astype(np.uint8)
    return np.ascontiguousarray(nibbles[:, 0::2] << 4 | nibbles[:, 1::2]).view("S16").reshape(-1)


def _part(keys: np.ndarray, n: int) -> np.ndarray:
    """Each key's partition of n: its first 8 bytes (a hash already) modulo n."""
    raw = np.frombuffer(keys.tobytes(), np.uint8).reshape(-1, 16)[:, :8].copy()
    return (raw.view("<u8").reshape(-1) % np.uint64(n)).astype(np.int64)


def earlier_task(url, storage, paths, source, names: dict[str, str], schema: pa.Schema, partitions):
    """(partitions,) tables of an earlier output's rows (`key`, `_source`, result columns under today's
    names), by key. `names`: today's result name -> the column it has there (its result_prefix)."""
    today = {there: name for name, there in names.items()}
    read = [read_columns(url, storage, p, list(names.values())) for p in paths]
    tables = [t.rename_columns([today[c] for c in t.column_names]) for t in read]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    table = table.filter(pc.is_valid(table.column("content_key")))
    keys = _hex_keys(table.column("content_key"))
    out = pa.table({"key": _key_array(keys), "_source": pa.array(np.full(len(keys), source, np.int16))})
    for field in schema:
        if field.name not in ("key", "_source", "content_key"):
            out = out.append_column(field, table.column(field.name).cast(field.type))
    return returns(split(out, _part(keys, partitions), partitions))


def key_task(storage, shards: list[dict], text_column: str, partitions):
    """(partitions,) tables of (`key`, `_shard`, `_row`) of these shards' rows with a text, by key."""
    digests, shard_of, rows = [], [], []
    for s in shards:
        fs, path = filesystem(s["url"], storage)
        table = read_rows(fs, path, format_of(path) or "parquet", s["start"], s["stop"], (), [text_column])
        table, bad = invalid_utf8(table)  # such a row is an error in the actor: never reused
        for i, text in enumerate(table.column(text_column).to_pylist()):
            if isinstance(text, str) and not (bad and bad[i]):
                digests.append(content_digest(text))
                shard_of.append(s["index"])
                rows.append(s["start"] + i)
    keys = np.frombuffer(b"".join(digests), "S16") if digests else np.zeros(0, "S16")
    out = pa.table({"key": _key_array(keys), "_shard": pa.array(shard_of, pa.int64()),
                    "_row": pa.array(rows, pa.int64())})  # fmt: skip
    return returns(split(out, _part(keys, partitions), partitions))


def match_task(groups, n_earlier, *tables: pa.Table):
    """(groups,) tables of this key partition's matches (`_shard`, `_row`, `_source`, result columns), by
    shard modulo `groups`. `tables`: the partition's earlier rows (n_earlier tables, in the order of the
    outputs and their files), then tonight's keys."""
    earlier = pa.concat_tables(tables[:n_earlier])
    tonight = pa.concat_tables(tables[n_earlier:])
    ukeys, first = np.unique(_keys(earlier.column("key")), return_index=True)  # the first listed's row
    want = _keys(tonight.column("key"))
    at = np.minimum(np.searchsorted(ukeys, want), max(len(ukeys) - 1, 0))  # in range: compared below
    hit = ukeys[at] == want if len(ukeys) else np.zeros(len(want), bool)
    found = earlier.take(first[at[hit]]).drop_columns(["key"])
    shards = tonight.column("_shard").filter(pa.array(hit))
    out = pa.table({"_shard": shards, "_row": tonight.column("_row").filter(pa.array(hit))})
    for i, name in enumerate(found.column_names):
        out = out.append_column(found.schema.field(i), found.column(name))
    group = (shards.to_numpy() % groups).astype(np.int64) if len(out) else np.zeros(0, np.int64)
    return returns(split(out, group, groups))


def write_task(output_url, storage, n_sources, *tables: pa.Table) -> list[int]:
    """One shard group's matches written, a file per shard (OUTPUT/_reuse/part-NNNNNN.parquet, sorted by
    row); the rows found in each earlier output."""
    table = pa.concat_tables(tables)
    fs, base = filesystem(output_url, storage)
    shards = table.column("_shard").to_numpy()
    for index in np.unique(shards):
        part = table.filter(pa.array(shards == index)).drop_columns(["_shard"]).sort_by("_row")
        path = f"{base.rstrip('/')}/{REUSE}/{part_name(int(index))}.parquet"
        write_whole(fs, path, lambda f, part=part: pq.write_table(part, f))
    sources = table.column("_source").to_numpy()
    return [int((sources == s).sum()) for s in range(n_sources)]


def find_reused(
    spec, sources: list, todo: list[dict], output_url: str, schema: pa.Schema, options: dict | None = None
) -> list[int]:
    """The reuse files of the shards in `todo` (dicts of `Shard`) written under `output_url`; the rows
    found in each of `sources` (`kinds.reuse.ReuseSource`, in order: a text in several takes the first's).
    `schema`: the rows a match carries (`key`, `_source`, today's result fields but `content_key`); `options`:
    Ray's task options for every task."""
    options = options or {}
    fs, base = filesystem(output_url, spec.storage)
    folder = f"{base.rstrip('/')}/{REUSE}"
    if fs.exists(folder):  # an interrupted run's: its shards are redone, matches with them
        fs.rm(folder, recursive=True)
    fs.makedirs(folder, exist_ok=True)
    row_bytes = 8 * len(schema) + 16 + max((s.token_bytes_per_row for s in sources), default=0)
    earlier_rows = sum(s.rows for s in sources)
    tonight_rows = sum(s["stop"] - s["start"] for s in todo)
    partitions = max(1, min(256, -(-earlier_rows * row_bytes // RESULT_BYTES_PER_PARTITION)))
    groups = max(1, min(len(todo), 256, -(-tonight_rows * row_bytes // RESULT_BYTES_PER_PARTITION)))
    groups = max(groups, min(len(todo), 2 * int(ray.cluster_resources().get("CPU", 1))))
    with_schema = schema.append(pa.field("content_key", pa.string()))
    earlier = remote(earlier_task, options, num_returns=partitions)
    slices = [(n, s.url, s.paths[i : i + FILES_PER_TASK])
              for n, s in enumerate(sources) for i in range(0, len(s.paths), FILES_PER_TASK)]  # fmt: skip
    if not slices:  # earlier outputs without a data file: nothing to find
        return [0] * len(sources)
    parts = [earlier.remote(url, spec.storage, paths, n, sources[n].names, with_schema, partitions)
             for n, url, paths in slices]  # fmt: skip
    parts = [p if partitions > 1 else [p] for p in parts]
    key = remote(key_task, options, num_returns=partitions)
    keyed = [key.remote(spec.storage, todo[i : i + SHARDS_PER_TASK], spec.text_column, partitions)
             for i in range(0, len(todo), SHARDS_PER_TASK)]  # fmt: skip
    keyed = [k if partitions > 1 else [k] for k in keyed]
    match = remote(match_task, options, num_returns=groups)
    matched = [match.remote(groups, len(parts), *(p[q] for p in parts), *(k[q] for k in keyed))
               for q in range(partitions)]  # fmt: skip
    matched = [m if groups > 1 else [m] for m in matched]
    write = remote(write_task, options)
    counts = ray.get([write.remote(output_url, spec.storage, len(sources), *(m[g] for m in matched))
                      for g in range(groups)])  # fmt: skip
    return [sum(c[n] for c in counts) for n in range(len(sources))]


def read_reused(output_url: str, storage, shard_index: int) -> pa.Table | None:
    """A shard's matches (`_row`, `_source`, result columns), or None where it has none."""
    fs, base = filesystem(output_url, storage)
    path = f"{base.rstrip('/')}/{REUSE}/{part_name(shard_index)}.parquet"
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return pq.read_table(f)


def shard_reused(spec, output_url: str, shard_index: int, table: pa.Table, bad: list | None):
    """In the actor: each row of a shard's `table` (with `_row`) as its `Reused` results, or None where it
    is computed tonight (no match, or the row is bad: its error wins), and the shard's counts for its
    marker (`ShardStats.reused*`; {} for a job without reuse)."""
    from ..kinds.rows import Reused

    found = read_reused(output_url, spec.storage, shard_index) if getattr(spec, "reuse", ()) else None
    if found is None:
        return None, {}
    at = {r: i for i, r in enumerate(table.column("_row").to_pylist())}
    out: list = [None] * len(table)
    sources, tokens = {}, 0
    values = found.drop_columns(["_row", "_source"]).to_pylist()
    for row, source, v in zip(found.column("_row").to_pylist(), found.column("_source").to_pylist(), values,
                              strict=True):  # fmt: skip
        i = at.get(row)
        if i is None or (bad and bad[i]):
            continue
        out[i] = Reused(v)
        sources[str(source)] = sources.get(str(source), 0) + 1
        tokens += v["token_count"]  # a score row's tokens
    return out, {"reused": sum(sources.values()), "reused_tokens": tokens, "reused_from": sources}
