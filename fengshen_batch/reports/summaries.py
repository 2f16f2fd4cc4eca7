"""A finished job's merged summary: the shards' own (from their markers) when they fit, else the data files'
(read in parallel, only the columns a summary needs). Works for any kind's sketch module (`score_sketch`,
`generate_sketch`): each names the result columns it reads (`RESULTS`) and the one that marks its output
(`MARKER`)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq

from ..io.outputs import DATA, OutputStore

REPORT = "report"


def _file_summary(
    store: OutputStore,
    path: str,
    sketch,
    text_column: str | None,
    by: str | None,
    prefix: str,
    id_column: str,
) -> dict:
    results, marker = sketch.RESULTS, sketch.MARKER
    with store.fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if prefix + marker not in names:
            raise ValueError(
                f"{store.url} is not the output of a {sketch.KIND} job (no {prefix}{marker} column)"
            )
        if by and by not in names:
            raise ValueError(f"column {by!r} is not in the output (columns: {', '.join(names)})")
        # a result (a generate job's filled-in prompt too) is read under its prefixed name
        canonical = {prefix + c: c for c in [*results, text_column] if c and prefix + c in names}
        inputs = [c for c in dict.fromkeys((id_column, text_column, by)) if c and c not in canonical.values()]
        table = pf.read(columns=list(dict.fromkeys([*inputs, *canonical])))
    out = table.rename_columns([canonical.get(n, n) for n in table.column_names])
    for c in (id_column, by):  # a column that is both, e.g. `--by bucket`, is also kept under its own name
        if c and c not in out.column_names:
            out = out.append_column(c, table.column(c))
    return sketch.summarize(out, text_column if text_column in out.column_names else None, by, id_column)


def summaries_from_files(
    store: OutputStore,
    sketch,
    text_column: str | None,
    by: str | None,
    prefix: str = "",
    id_column: str = "id",
) -> list[dict]:
    """Per-file summaries of OUTPUT/data, read in parallel (the report rebuilt for another column)."""
    files = store.files(DATA)
    if not files:
        raise ValueError(f"no data files under {store.url}/{DATA}: is this a job's output?")
    with ThreadPoolExecutor(16) as pool:
        return list(
            pool.map(lambda p: _file_summary(store, p, sketch, text_column, by, prefix, id_column), files)
        )


def merged_summary(
    store: OutputStore,
    sketch,
    text_column: str | None,
    by: str | None,
    summaries: list | None,
    need_buckets=False,
    prefix: str = "",
    id_column: str = "id",
) -> dict:
    """The shards' own summaries merged, if every shard has one made for `by` (and, with `need_buckets`,
    bucket counts: quantile buckets are added to the files after their shards were summarised); else the
    data files' summaries (results named with `prefix`), read in parallel."""
    fresh = bool(summaries) and all(s is not None and s.get("by") == by for s in summaries)
    if fresh and need_buckets and not any("buckets" in s for s in summaries):
        fresh = False
    parts = summaries if fresh else summaries_from_files(store, sketch, text_column, by, prefix, id_column)
    return sketch.merge(parts)
