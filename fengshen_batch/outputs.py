"""The output folder: per-shard Parquet committed by markers, then manifest.json and _SUCCESS.

Layout under OUTPUT/:
    data/part-000042.parquet      results of shard 42 (explicit schema, written even when empty)
    errors/part-000042.parquet    rows of shard 42 that failed, with error_kind and error_message
    _markers/part-000042.json     written last for the shard: it is committed (rows, tokens, spec hash)
    manifest.json                 the job: spec, model, inputs, counts, timings, versions
    _SUCCESS                      written last of all, when every shard is committed
    _overwrite/                   an --overwrite run's new output, built beside the old one, then copied in

Shard files have deterministic names, so a rerun overwrites a half-written shard instead of duplicating it,
and skips every shard whose marker exists. On object stores a single PUT is atomic: no renames are needed.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .inputs import Shard
from .spec import StorageSpec
from .storage import filesystem, join

DATA, ERRORS, MARKERS, STAGING = "data", "errors", "_markers", "_overwrite"
INTERNAL = ["_shard", "_row"]
# Spec fields that change how a job runs but not its results: a rerun may change them freely.
RUNTIME_FIELDS = {
    "runtime_env",
    "name",
    "output",
    "actors",
    "gpus_per_actor",
    "cpus_per_actor",
    "batch_size",
    "token_budget",
    "address",
    "max_num_seqs",
    "gpu_memory_utilization",
    "cpu_kv_cache_gb",
    "cuda_graphs",
    "max_concurrent_batches",
}


def spec_hash(record: dict) -> str:
    """Hash of the spec fields that determine results; markers carry it so configurations never mix."""
    relevant = {k: v for k, v in record.items() if k not in RUNTIME_FIELDS}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def part_name(index: int) -> str:
    return f"part-{index:06d}"


@dataclass(frozen=True)
class ShardStats:
    rows: int  # input rows
    results: int  # output rows in data/ (samples, for generation)
    errors: int  # input rows in errors/
    tokens: int  # tokens the model processed


class OutputStore:
    def __init__(self, url: str, storage: StorageSpec):
        self.url = url.rstrip("/")
        self._storage = storage
        self.fs, self.path = filesystem(url, storage)

    def _p(self, *parts: str) -> str:
        return join(self.path, *parts)

    def published_manifest(self) -> dict | None:
        """The manifest of a finished job at this output, or None."""
        if not self.fs.exists(self._p("_SUCCESS")):
            return None
        return json.loads(self.fs.cat_file(self._p("manifest.json")))

    def exists(self) -> bool:
        return self.fs.exists(self.path) and bool(self.fs.ls(self.path))

    def staging(self) -> OutputStore:
        """Where an --overwrite run builds its output while the old one stays in place."""
        return OutputStore(join(self.url, STAGING), self._storage)

    def clear(self) -> None:
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)

    def replace_with(self, staging: OutputStore) -> None:
        """Make the staged output this output: unpublish, copy the new files in, drop stale ones.

        The staged copy is removed only at the end, so a run killed here redoes the copy on its rerun.
        """
        for name in ("_SUCCESS", "manifest.json"):
            if self.fs.exists(self._p(name)):
                self.fs.rm(self._p(name))
        for folder in (DATA, ERRORS, MARKERS):  # markers last, as for a single shard
            new = {p.rsplit("/", 1)[-1] for p in staging.fs.find(staging._p(folder))}
            old = {p.rsplit("/", 1)[-1] for p in self.fs.find(self._p(folder))}
            self.fs.makedirs(self._p(folder), exist_ok=True)
            for name in sorted(new):
                self.fs.copy(staging._p(folder, name), self._p(folder, name))
            for name in sorted(old - new):
                self.fs.rm(self._p(folder, name))
        staging.clear()

    def files(self, folder: str) -> list[str]:
        """The Parquet files under OUTPUT/folder, in shard order."""
        if not self.fs.exists(self._p(folder)):
            return []
        return sorted(p for p in self.fs.find(self._p(folder)) if p.endswith(".parquet"))

    def read(self, folder: str, columns: list[str] | None = None) -> pa.Table | None:
        """All of OUTPUT/folder as one table (None where it has no files)."""
        tables = [pq.read_table(self.fs.open(p, "rb"), columns=columns) for p in self.files(folder)]
        return pa.concat_tables(tables, promote_options="default") if tables else None

    def committed(self) -> dict[int, dict]:
        """Markers of committed shards, listed once: {shard index: marker}."""
        if not self.fs.exists(self._p(MARKERS)):
            return {}
        markers = {}
        for path in self.fs.find(self._p(MARKERS)):
            if path.endswith(".json"):
                marker = json.loads(self.fs.cat_file(path))
                markers[marker["shard"]] = marker
        return markers

    def write_shard(
        self, shard: Shard, data: pa.Table, errors: pa.Table, stats: ShardStats, hash_: str
    ) -> None:
        """Data and errors first, the marker last: a shard without its marker is redone on a rerun."""
        name = part_name(shard.index)
        for folder, table in ((DATA, data), (ERRORS, errors)):
            self.fs.makedirs(self._p(folder), exist_ok=True)
            with self.fs.open(self._p(folder, f"{name}.parquet"), "wb") as f:
                pq.write_table(table, f)
        marker = {
            "shard": shard.index,
            "file": shard.name,
            "start": shard.start,
            "stop": shard.stop,
            "spec_hash": hash_,
            **stats.__dict__,
        }
        self.fs.makedirs(self._p(MARKERS), exist_ok=True)
        self.fs.pipe_file(self._p(MARKERS, f"{name}.json"), json.dumps(marker).encode())

    def publish(self, manifest: dict) -> None:
        self.fs.pipe_file(self._p("manifest.json"), json.dumps(manifest, indent=2).encode())
        self.fs.pipe_file(self._p("_SUCCESS"), b"")


class ShardAssembler:
    """Collects model-stage rows per shard until all of a shard's input rows are back, then splits them."""

    def __init__(self, shards: list[Shard], kind: str, data_schema: pa.Schema, error_schema: pa.Schema):
        self.shards = {s.index: s for s in shards}
        self.kind = kind
        self.data_schema, self.error_schema = data_schema, error_schema
        self.pending: dict[int, list[pa.Table]] = defaultdict(list)
        self.seen_rows: dict[int, set[int]] = defaultdict(set)

    def add(self, table: pa.Table) -> list[tuple[Shard, pa.Table, pa.Table, ShardStats]]:
        """Take one batch of model output; return the shards it completed."""
        done = []
        for index in pc.unique(table.column("_shard")).to_pylist():
            part = table.filter(pc.equal(table.column("_shard"), index))
            self.pending[index].append(part)
            self.seen_rows[index].update(part.column("_row").to_pylist())
            shard = self.shards[index]
            if len(self.seen_rows[index]) == shard.stop - shard.start:
                done.append(self._complete(shard))
        return done

    @property
    def open_shards(self) -> int:
        return len(self.pending)

    @property
    def rows_open(self) -> int:
        """Input rows of not yet complete shards whose results are here (for progress)."""
        return sum(len(rows) for rows in self.seen_rows.values())

    def _complete(self, shard: Shard) -> tuple[Shard, pa.Table, pa.Table, ShardStats]:
        rows = pa.concat_tables(self.pending.pop(shard.index))
        del self.seen_rows[shard.index]
        # A retried batch may come back twice: keep one row per (input row, sample).
        rows = _dedupe(rows, ["_row", "sample_index"] if self.kind == "generate" else ["_row"])
        failed = pc.is_valid(rows.column("error_kind"))
        good, bad = rows.filter(pc.invert(failed)), rows.filter(failed)
        expected = shard.stop - shard.start
        good_rows = len(pc.unique(good.column("_row")))
        if good_rows + len(bad) != expected or set(good.column("_row").to_pylist()) & set(
            bad.column("_row").to_pylist()
        ):
            raise RuntimeError(
                f"shard {shard.index}: {good_rows} results + {len(bad)} errors != {expected} rows"
            )
        good = good.sort_by("_row").drop_columns([*INTERNAL, "error_kind", "error_message"])
        bad = bad.sort_by("_row").drop_columns(INTERNAL)
        if self.kind == "score":
            tokens = pc.sum(good.column("token_count")).as_py() or 0
        elif self.kind == "judge":
            tokens = pc.sum(pc.list_flatten(good.column("candidate_token_count"))).as_py() or 0
        else:
            tokens = sum(pc.sum(good.column(c)).as_py() or 0 for c in ("prompt_tokens", "generated_tokens"))
        stats = ShardStats(expected, len(good), len(bad), int(tokens))
        data = good.select(self.data_schema.names).cast(self.data_schema)
        errors = bad.select(self.error_schema.names).cast(self.error_schema)
        return shard, data, errors, stats


def _dedupe(table: pa.Table, key: list[str]) -> pa.Table:
    seen, keep = set(), []
    for i, k in enumerate(zip(*(table.column(c).to_pylist() for c in key), strict=True)):
        if k not in seen:
            seen.add(k)
            keep.append(i)
    return table if len(keep) == len(table) else table.take(pa.array(keep, pa.int64()))
