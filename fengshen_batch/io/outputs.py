"""The output folder and its committer: per-shard Parquet committed by markers, then manifest.json and _SUCCESS.

Layout under OUTPUT/:
    data/part-000042.parquet      results of shard 42 (explicit schema, written even when empty)
    errors/part-000042.parquet    rows of shard 42 that failed, with error_kind and error_message
    _markers/part-000042.json     written last for the shard: it is committed (rows, tokens, spec hash)
    manifest.json                 the job: spec, model, inputs, counts, timings, versions
    _SUCCESS                      written last of all, when every shard is committed
    signatures/part-000042.parquet  dedup jobs: MinHash signatures of shard 42's samples (actor-written)
    duplicates/part-000042.parquet  dedup_output: drop: shard 42's samples that near-duplicate a kept one
    _overwrite/                   an --overwrite run's new output, built beside the old one, then copied in

The model actors write a shard's data and error files (`writer.py`); the driver only writes its marker, from
the counts the actor sends back. Shard files have deterministic names, so a rerun rewrites an unmarked shard
instead of duplicating it, and skips every shard whose marker exists.
"""

from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import JobError
from .inputs import Shard
from .redact import redact_url
from .storage import StorageSpec, filesystem, join, write_whole

DATA, ERRORS, MARKERS, STAGING = "data", "errors", "_markers", "_overwrite"
SIGNATURES, DUPLICATES = "signatures", "duplicates"
REUSE = "_reuse"  # a score job's matches in earlier outputs, per shard, until it is published
# A shard's files besides its marker: data and errors always, signatures and duplicates with dedup.
SHARD_FOLDERS = (DATA, ERRORS, SIGNATURES, DUPLICATES)
# What this tool writes at the top of an output: anything else there is not ours to overwrite.
OWN_ENTRIES = {*SHARD_FOLDERS, MARKERS, STAGING, REUSE, "report", "manifest.json", "_SUCCESS", "_lease.json"}
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
    "enable_prefix_caching",
    "max_concurrent_batches",
    # what today's output is compared with, and when that comparison alerts: the report's, not the data's
    "baseline",
    "baseline_check",
    "baseline_missing",
    "drift_threshold",
    # where earlier results are taken from: a reused row holds the result its text had there (same model,
    # tokenizer and settings, checked), so outputs with and without reuse hold the same results
    "reuse",
    "reuse_mismatch",
    "on_input_change",  # what a rerun does about a changed input; the results are the input's either way
}


# Fields a kind gained after outputs of it existed: left out of the hash while at their default, so a rerun
# over an older output still finds its own configuration there.
ADDED_FIELDS = {
    "generate": {
        "report_by": None,
        "constraint": None,
        "constraint_column": None,
        "constraint_backend": "llguidance",
        "few_shot": None,
        "dedup": None,
        "dedup_output": "mark",
    },
    "score": {"dedup": None, "dedup_output": "mark"},
    "judge": {"report_by": None},
}


def _relevant(record: dict) -> dict:
    """The spec fields that determine results (a field added since, at its default, is left out)."""
    added = ADDED_FIELDS.get(record.get("kind"), {})
    return {k: v for k, v in record.items() if k not in RUNTIME_FIELDS and not (k in added and v == added[k])}


def spec_hash(record: dict) -> str:
    """Hash of the spec fields that determine results; markers carry it so configurations never mix."""
    return hashlib.sha256(json.dumps(_relevant(record), sort_keys=True).encode()).hexdigest()[:16]


def spec_differences(old: dict, new: dict, limit: int = 3) -> str:
    """The result-determining settings in which two spec records differ, for a refusal's message:
    `temperature 0.7 there, 0.9 here; max_new_tokens 64 there, 128 here`."""
    a, b = _relevant(old), _relevant(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))

    def show(v) -> str:
        text = json.dumps(v, ensure_ascii=False)
        return text if len(text) <= 60 else text[:57] + "..."

    parts = [f"{k} {show(a.get(k))} there, {show(b.get(k))} here" for k in keys[:limit]]
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return "; ".join(parts) + more


def sum_counts(counts: list[dict]) -> dict:
    """Shards' counts added up key by key (nested dicts of numbers, e.g. a judge job's correct answers per
    criterion): the driver's running total instead of a pass over the output."""
    total: dict = {}
    for c in counts:
        for k, v in c.items():
            total[k] = sum_counts([total.get(k, {}), v]) if isinstance(v, dict) else total.get(k, 0) + v
    return total


def part_name(index: int) -> str:
    return f"part-{index:06d}"


PART_FILE = re.compile(r"part-\d{6}\.(parquet|json)")  # a shard's data, errors or marker file


@dataclass(frozen=True)
class ShardStats:
    rows: int  # input rows
    results: int  # output rows in data/ (samples, for generation)
    errors: int  # input rows in errors/
    tokens: int  # tokens the model processed
    error_kinds: dict[str, int] = field(default_factory=dict)  # rows in errors/ per error_kind
    # Generation: prompt tokens run (one prefill per prompt) and those the prefix cache supplied
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    # prompts cut from the left to fit (prompt_too_long: truncate_left), and the tokens cut off them
    truncated_prompts: int = 0
    truncated_prompt_tokens: int = 0
    # Score jobs with `reuse`: rows whose results came from an earlier output (not counted in `tokens`),
    # their tokens, and the rows per earlier output (its place in the job's list, as a string)
    reused: int = 0
    reused_tokens: int = 0
    reused_from: dict[str, int] = field(default_factory=dict)


class OutputStore:
    def __init__(self, url: str, storage: StorageSpec):
        self.url = url.rstrip("/")
        self._storage = storage
        self.fs, self.path = filesystem(url, storage)

    def path_to(self, *parts: str) -> str:
        """The path of OUTPUT/parts... on its filesystem."""
        return join(self.path, *parts)

    def published_manifest(self) -> dict | None:
        """The manifest of a finished job at this output, or None. A `_SUCCESS` without a manifest of ours
        (another tool's finished output, e.g. Spark's) is an error naming it."""
        if not self.fs.exists(self.path_to("_SUCCESS")):
            return None
        try:
            manifest = json.loads(self.fs.cat_file(self.path_to("manifest.json")))
        except (FileNotFoundError, ValueError):
            manifest = None
        if not isinstance(manifest, dict) or "spec_hash" not in manifest:
            raise JobError(
                f"{redact_url(self.url)} holds a _SUCCESS without a fengshen-batch manifest.json: another tool's "
                "output, which this job will neither read nor overwrite; use a new output"
            )
        return manifest

    def foreign_entries(self) -> list[str]:
        """Top-level entries of this output that no fengshen-batch job writes (empty for a fresh folder, or
        one of our outputs)."""
        if not self.fs.exists(self.path):
            return []
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False))
        return [n for n in names if n not in OWN_ENTRIES and not n.startswith(".")]

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
        self.unpublish()
        for folder in (*SHARD_FOLDERS, MARKERS):  # markers last, as for a single shard
            new, old = staging.own_files(folder), self.own_files(folder)
            if not new and not old and folder not in (DATA, ERRORS, MARKERS):
                continue  # a folder only dedup jobs write
            self.fs.makedirs(self.path_to(folder), exist_ok=True)
            for name in sorted(new):
                self.fs.copy(staging.path_to(folder, name), self.path_to(folder, name))
            for name in sorted(old - new):
                self.fs.rm(self.path_to(folder, name))
        staging.clear()

    def unpublish(self) -> None:
        """No longer a finished output: `_SUCCESS` first, then the manifest."""
        for name in ("_SUCCESS", "manifest.json"):
            if self.fs.exists(self.path_to(name)):
                self.fs.rm(self.path_to(name))

    def drop_shards(self, indices) -> None:
        """Forget these shards: marker first (so a crash between leaves a shard to redo, never a marker
        without its files), then its data and errors files."""
        for i in sorted(indices):
            for folder, ext in ((MARKERS, "json"), *((f, "parquet") for f in SHARD_FOLDERS)):
                path = self.path_to(folder, f"{part_name(i)}.{ext}")
                if self.fs.exists(path):
                    self.fs.rm(path)

    def own_files(self, folder: str) -> set[str]:
        """Names of the shard files directly in OUTPUT/folder (`part-000042.parquet`, `.json`): the files
        jobs of this tool write there. Anything else (a user's nested folder, another name) is never
        copied or removed by an overwrite."""
        if not self.fs.exists(self.path_to(folder)):
            return set()
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path_to(folder), detail=False))
        return {n for n in names if PART_FILE.fullmatch(n)}

    def files(self, folder: str) -> list[str]:
        """The Parquet files under OUTPUT/folder, in shard order."""
        if not self.fs.exists(self.path_to(folder)):
            return []
        return sorted(p for p in self.fs.find(self.path_to(folder)) if p.endswith(".parquet"))

    def read(self, folder: str, columns: list[str] | None = None) -> pa.Table | None:
        """All of OUTPUT/folder as one table (None where it has no files)."""
        tables = [pq.read_table(self.fs.open(p, "rb"), columns=columns) for p in self.files(folder)]
        return pa.concat_tables(tables, promote_options="default") if tables else None

    def committed(self) -> dict[int, dict]:
        """Markers of committed shards, listed once: {shard index: marker}."""
        if not self.fs.exists(self.path_to(MARKERS)):
            return {}
        paths = [p for p in self.fs.find(self.path_to(MARKERS)) if p.endswith(".json")]
        # One small GET each: in parallel, or a resumed night of 25k shards waits minutes before it starts.
        with ThreadPoolExecutor(32) as pool:
            markers = list(pool.map(lambda path: json.loads(self.fs.cat_file(path)), paths))
        return {m["shard"]: m for m in markers}

    def commit(self, shard: Shard, stats: ShardStats, hash_: str, summary: dict | None = None) -> None:
        """Mark a shard committed, once a worker has written its data and error files (`writer.py`): a
        shard without its marker is redone on a rerun. A marker also keeps the shard's summary (score: sketches; judge: label counts)."""
        marker = {
            "shard": shard.index,
            "file": shard.name,
            "start": shard.start,
            "stop": shard.stop,
            "version": shard.version,  # its input file's, as planned: a rerun tells a changed input by it
            **({"route": shard.route, "routes": shard.routes} if shard.routes > 1 else {}),
            "spec_hash": hash_,
            **stats.__dict__,
            **({"summary": summary} if summary else {}),
        }
        self.fs.makedirs(self.path_to(MARKERS), exist_ok=True)
        # Whole or not at all: a driver killed mid-write must not leave a marker a rerun cannot read.
        data = json.dumps(marker).encode()
        write_whole(self.fs, self.path_to(MARKERS, f"{part_name(shard.index)}.json"), lambda f: f.write(data))

    def publish(self, manifest: dict) -> None:
        data = json.dumps(manifest, indent=2).encode()
        write_whole(self.fs, self.path_to("manifest.json"), lambda f: f.write(data))
        self.fs.pipe_file(self.path_to("_SUCCESS"), b"")
