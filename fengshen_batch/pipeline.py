"""All of the Ray wiring: start or join Ray, and the Ray Data pipeline shards -> model actors -> commits.

    from_items(shards) --map_batches(ModelActor, actor pool, 1 GPU each, one shard per call)-->
        the actor reads its shard (inputs.read_shard), runs the engine on id + text in slices of
        `batch_size` rows, writes the shard's data/ and errors/ files (writer.py)
    --> one small commit record per shard --iter_batches--> the driver, which writes the shard's marker

Data moves where the data is: rows, texts and passthrough columns go from storage to the actor that
computes on them and back to storage, never through the object store or the driver (whose memory is
O(shards)). The actor is thin: it loads one replica in `__init__` and runs the engine in `__call__`. Several
shards are in flight in one actor (threaded calls): for generation they feed its one engine, which admits
the next shard's prompts as the current one's sequences finish; for scoring and judging one shard computes
while the next is read (or the last written).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict

import pyarrow as pa
import ray

from .inputs import ID_COLUMN, Shard, read_shard
from .progress import Reporter
from .schemas import internal_schemas
from .spec import GenerateJob, ScoreJob, build_spec

log = logging.getLogger(__name__)

LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
STARTUP_KEY = b"fengshen.actor_startup"  # schema metadata of an actor's output: its start-up timestamps
COMMIT_SCHEMA = pa.schema(
    [("shard", pa.int64()), ("rows", pa.int64()), ("results", pa.int64()), ("errors", pa.int64()),
     ("tokens", pa.int64()), ("error_kinds", pa.string()), ("prompt_tokens", pa.int64()),
     ("cached_prompt_tokens", pa.int64()), ("summary", pa.string())]
)  # fmt: skip


def init_ray(address: str | None, min_cpus: float = 1) -> bool:
    """Join `address` (or RAY_ADDRESS), else start an embedded Ray on 127.0.0.1; True if started here."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    host = address.rsplit(":", 1)[0].split("://")[-1] if address else None
    if not address or host in ("127.0.0.1", "localhost"):
        # A Ray that talks over loopback only (ours, or a head on this machine at 127.0.0.1). Ray maps
        # 127.0.0.1 to the machine's interface address unless its local-only mode is on (its own switch,
        # the default on macOS/Windows); the constant is read at call time, the variable covers the
        # processes Ray starts.
        os.environ[LOCAL_ONLY_ENV] = "0"
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # Logical CPUs: enough for the actors plus the read tasks, whatever this machine's core count.
        cpus = max(os.cpu_count() or 1, int(min_cpus) + 1)
        # Only what a job needs: no dashboard, and no metrics pipeline (nothing would read it; the raylet
        # otherwise waits for the metrics agent at start).
        ray.init(
            include_dashboard=False,
            num_cpus=cpus,
            logging_level=logging.WARNING,
            _system_config={"enable_metrics_collection": False},
        )
    return True


def cluster_gpus() -> float:
    return ray.cluster_resources().get("GPU", 0.0)


def compute_lock(spec):
    """What keeps an actor's replica to one computing call at a time (scoring and judging: the other call
    reads or writes meanwhile); generation needs none: the engine thread interleaves the calls' prompts."""
    return contextlib.nullcontext() if spec.kind == "generate" else threading.Lock()


def load_replicas(spec):
    """In an actor: the spec's model (and reference model) on this actor's device, and a generate job's engine
    in its thread; returns (Replicas, the token budget to start from, when the imports were done)."""
    import torch

    from .loading import load_replica
    from .rows import Replicas
    from .storage import storage_options

    imported_at = time.time()
    on_gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
    if not on_gpu:
        torch.set_num_threads(max(1, int(spec.cpus_per_actor)))

    def load(source: str):
        return load_replica(
            source,
            device="cuda" if on_gpu else "cpu",
            dtype=spec.dtype,
            trust_remote_code=spec.trust_remote_code,
            storage_options=storage_options(source, spec.storage),
        )

    reference = getattr(spec, "reference_model", None)
    replicas = Replicas(load(spec.model), reference=load(reference) if reference else None)
    if spec.kind == "generate":
        from .engine.llm_engine import EngineThread, LLMEngine

        replicas.engine = EngineThread(
            LLMEngine(replicas.model, spec.params(), spec.engine_params(), spec.token_budget)
        )
    return replicas, spec.token_budget or (16384 if on_gpu else 2048), imported_at


class ModelActor:
    """One model replica on one device (a GPU when the actor was given one, else the CPU).

    A call takes shard descriptors and returns their commit records; the rows stay in this process.
    Generate jobs: the replica's one engine runs in a background thread; several shards are in flight in
    this actor at once (threaded calls), each submitting its prompts to that engine and waiting for them.
    """

    def __init__(
        self, spec: dict, id_column: str | None, output: str, schemas: tuple[pa.Schema, pa.Schema], board=None
    ):
        init_at = time.time()
        self.spec = build_spec(spec)
        self.reporter = Reporter(board, self.spec)  # says "loading" to the driver's line
        self.replicas, self.token_budget, imported_at = load_replicas(self.spec)
        engine = self.replicas.engine
        self.reporter.ready(engine.engine.stats if engine is not None else None)
        self.id_column, self.output = id_column, output
        self.id_field = id_column or ID_COLUMN  # derived by read_shard where the input has no id column
        self.data_schema, self.error_schema = schemas  # as written
        self.renamed, self.internal_data, self.internal_errors = internal_schemas(self.spec, *schemas)
        self.lock = compute_lock(self.spec)
        # Wall-clock times (the driver compares them with its own; one machine, or NTP-synced nodes).
        self.startup = {
            "init_at": init_at,
            "imports": imported_at - init_at,
            "load": time.time() - imported_at,
        }

    def __call__(self, batch: pa.Table) -> pa.Table:
        self.startup.setdefault("first_call_at", time.time())
        self.reporter.phase = "computing"
        records = [self._shard(Shard(**row)) for row in batch.to_pylist()]
        self.reporter.flush()
        out = pa.Table.from_pylist(records, schema=COMMIT_SCHEMA)
        return out.replace_schema_metadata({STARTUP_KEY: json.dumps(self.startup).encode()})

    def _shard(self, shard: Shard) -> dict:
        """Read, compute and write one shard; return its commit record."""
        from .generation import PromptUsage
        from .rows import id_errors, process_table
        from .writer import split_results, with_buckets, write_shard_files

        table = read_shard(shard, self.spec.storage, self.id_column, self.spec.drop_columns)
        table = table.rename_columns([self.renamed.get(n, n) for n in table.column_names])
        # ids from the input are checked across the whole shard (derived ones are unique by construction)
        bad_ids = id_errors(table.column(self.id_field).to_pylist()) if self.id_column else None
        # Generation: the whole shard into the engine at once (it schedules per step); the other kinds in
        # slices of batch_size rows (one engine call each, and one row-by-row retry at most that large).
        step = max(1, len(table)) if self.spec.kind == "generate" else self.spec.batch_size
        parts, usage = [], PromptUsage()
        # Scoring and judging: one call computes while the other reads or writes its shard.
        with self.lock:
            for start in range(0, len(table), step):
                part, self.token_budget = process_table(
                    self.replicas, self.spec, table.slice(start, step), self.id_field, self.token_budget,
                    bad_ids[start : start + step] if bad_ids else None, usage,
                )  # fmt: skip
                parts.append(part)
                self._count(part)
        rows = pa.concat_tables(parts)
        data, errors, stats = split_results(
            shard, rows, self.spec.kind, self.internal_data, self.internal_errors
        )
        summary = None  # what the driver adds up across shards instead of reading the output back
        if self.spec.kind == "score":
            from .sketch import summarize

            if self.spec.bucket_thresholds:  # fixed cutoffs: the bucket is known at write time
                data = with_buckets(data, list(self.spec.bucket_thresholds), self.spec.bucket_by)
            summary = json.dumps(summarize(data, self.spec.text_column, self.spec.report_by, self.id_field))
        elif self.spec.kind == "generate":
            from .sample_sketch import summarize

            summary = json.dumps(summarize(data, self._prompt_field(), self.spec.report_by, self.id_field))
        elif self.spec.kind == "judge" and self.spec.label_column:
            from .judging import label_counts

            columns = ["statements", "candidate_nll_sum", "candidate_token_count", self.spec.label_column]
            columns += [self.spec.answers_column] if self.spec.answers_column else []
            counts = label_counts(
                data.select(columns).to_pylist(), self.spec.label_column, self.spec.answers_column
            )
            summary = json.dumps(counts)
        # the names the files have: input columns as they were, results with the spec's result_prefix
        names = self.data_schema.names + [self.spec.result_prefix + "bucket"] * (
            "bucket" in data.column_names
        )
        data, errors = data.rename_columns(names), errors.rename_columns(self.error_schema.names)
        write_shard_files(self.output, self.spec.storage, shard, data, errors)
        return {
            "shard": shard.index,
            **stats.__dict__,
            "error_kinds": json.dumps(stats.error_kinds),
            "prompt_tokens": usage.prompt_tokens,
            "cached_prompt_tokens": usage.cached_tokens,
            "summary": summary,
        }

    def _count(self, part: pa.Table) -> None:
        """A slice's finished rows, errors and tokens for the progress line (generation: the engine counts
        its prompts, samples and tokens itself; here only the rows that never reached it)."""
        import pyarrow.compute as pc

        failed = pc.is_valid(part.column("error_kind"))
        errors = pc.sum(failed).as_py() or 0  # one row each
        if self.spec.kind == "generate":
            self.reporter.add(rows=errors, errors=errors)
            return
        column = "token_count" if self.spec.kind == "score" else "candidate_token_count"
        values = part.filter(pc.invert(failed)).column(column)
        tokens = pc.sum(pc.list_flatten(values) if pa.types.is_list(values.type) else values).as_py() or 0
        self.reporter.add(rows=part.num_rows, tokens=tokens, errors=errors)  # one output row per input row

    def _prompt_field(self) -> str | None:
        """The prompts' column in the shard's internal data (for the report's examples), if it has one."""
        spec = self.spec
        if spec.prompt_template:  # the filled-in prompt, a result column, if it is kept
            return spec.prompt_column if spec.keep_prompt else None
        return self.renamed.get(spec.prompt_column, spec.prompt_column)


class RowsActor:
    """The processors' actor (`processors.py`): the job's replica, engine and per-row work over a user's Dataset
    batch, returned with the result columns and `error_kind`/`error_message` appended (generation: one row per
    sample). No files, markers or summaries: the user's pipeline owns what comes next."""

    def __init__(self, spec: dict):
        self.spec = build_spec(spec)
        self.replicas, self.token_budget, _ = load_replicas(self.spec)
        self.lock = compute_lock(self.spec)

    def __call__(self, table: pa.Table) -> pa.Table:
        from .rows import id_errors, process_table
        from .schemas import ERROR_FIELDS, result_fields

        spec, id_column = self.spec, self.spec.id_column or ID_COLUMN
        if spec.drop_columns:
            table = table.drop_columns([c for c in spec.drop_columns if c in table.column_names])
        has_ids = id_column in table.column_names
        if has_ids:
            bad_ids = id_errors(table.column(id_column).to_pylist())  # within the batch
        elif spec.kind == "generate" or spec.id_column:
            from .errors import InputError

            raise InputError(
                f"id column {id_column!r} not in the dataset (columns: {', '.join(table.column_names)}): "
                "samples are seeded by row id; add one or name it with id_column"
            )
        else:  # scoring and judging use ids only to name rows: a position in the batch will do
            bad_ids, id_column = None, "_id"
            table = table.append_column(id_column, pa.array([str(i) for i in range(len(table))]))
        with self.lock:
            out, self.token_budget = process_table(
                self.replicas, spec, table, id_column, self.token_budget, bad_ids
            )
        if not has_ids:
            out = out.drop_columns([id_column])
        # results, then the error columns, end the table: results get the spec's result_prefix
        results = [spec.result_prefix + f.name for f in result_fields(spec)]
        inputs = out.column_names[: -len(results) - len(ERROR_FIELDS)]
        return out.rename_columns([*inputs, *results, *(f.name for f in ERROR_FIELDS)])


def map_rows(ds: ray.data.Dataset, spec, gpus: float) -> ray.data.Dataset:
    """`ds` through RowsActor pool of `spec.actors` replicas (lazy, as Ray Data is)."""
    return ds.map_batches(
        RowsActor,
        batch_size=spec.batch_size,
        batch_format="pyarrow",
        fn_constructor_kwargs={"spec": spec.model_dump(mode="json")},
        compute=_compute(spec),
        num_gpus=gpus,
        num_cpus=spec.cpus_per_actor,
    )


def actor_startup(batch: pa.Table, pipeline_at: float) -> dict[str, float]:
    """Start-up phases seen by the actor that produced `batch` (seconds): `plan` (pipeline start to the
    actor's `__init__`: Ray Data planning, read tasks, actor scheduling and process start), `actor_imports`
    (torch and the engine's modules), `replica_load`, and `first_call_wait` (replica ready to its first batch)."""
    raw = (batch.schema.metadata or {}).get(STARTUP_KEY)
    if raw is None:
        return {}
    s = json.loads(raw)
    ready_at = s["init_at"] + s["imports"] + s["load"]
    return {
        "plan": s["init_at"] - pipeline_at,
        "actor_imports": s["imports"],
        "replica_load": s["load"],
        "first_call_wait": s["first_call_at"] - ready_at,
    }


SHARDS_IN_FLIGHT = 2  # scoring and judging, per actor: one computing, one being read or written


def _compute(spec: ScoreJob | GenerateJob):
    """The actor pool. A batch job wants every replica it may have from the start; the pool shrinks to
    `min` when idle. Several calls run in each actor at once (threads): generate jobs
    `max_concurrent_batches` into one engine; the other kinds SHARDS_IN_FLIGHT, so that reading and writing
    shards overlaps the model's work instead of leaving the device idle."""
    lo, hi = spec.actors
    sizes = {"size": lo} if lo == hi else {"min_size": lo, "max_size": hi, "initial_size": hi}
    k = spec.max_concurrent_batches if spec.kind == "generate" else SHARDS_IN_FLIGHT
    if k == 1:
        return ray.data.ActorPoolStrategy(**sizes)
    return ray.data.ActorPoolStrategy(
        **sizes,
        max_tasks_in_flight_per_actor=k,
        max_concurrent_calls_per_actor=k,
        enable_true_multi_threading=True,
    )


def rebucket(
    output: str, storage, files: list[str], cutoffs: list[float], column: str, bucket: str = "bucket"
) -> dict[str, int]:
    """Rewrite every data file with its bucket column, in parallel Ray tasks; return rows per bucket.

    Two tasks per cluster CPU, each rewriting a slice of the files (a few threads each, for object-store
    latency): a task per file would start a worker process per concurrent task, which costs more than
    rewriting a shard's file (25 ms for 7 MB here)."""
    from .outputs import sum_counts
    from .writer import rebucket_files

    tasks = max(1, min(len(files), 2 * int(ray.cluster_resources().get("CPU", 1))))
    task = ray.remote(num_cpus=1)(rebucket_files)
    parts = [task.remote(output, storage, files[i::tasks], cutoffs, column, bucket) for i in range(tasks)]
    return sum_counts(ray.get(parts))


def run_pipeline(
    spec: ScoreJob | GenerateJob,
    shards: list[Shard],
    id_column: str | None,
    gpus: float,
    output: str,
    schemas: tuple[pa.Schema, pa.Schema],
    ray_progress: bool = False,
    board=None,
) -> Iterator[pa.Table]:
    """Stream commit records (COMMIT_SCHEMA, one row per shard written under `output`) to the driver; the
    actors post their in-flight counts to `board` (`start_board`).

    Ray Data's progress bars only with `ray_progress`: the job draws its own progress line."""
    ray.data.DataContext.get_current().enable_progress_bars = ray_progress
    ds = ray.data.from_items([asdict(s) for s in shards], override_num_blocks=max(1, len(shards)))
    ds = ds.map_batches(
        ModelActor,
        batch_size=1,  # one shard per call: the unit of writing, retry and commit
        batch_format="pyarrow",
        fn_constructor_kwargs={
            "spec": spec.model_dump(mode="json"),
            "id_column": id_column,
            "output": output,
            "schemas": schemas,
            "board": board,
        },  # fmt: skip
        compute=_compute(spec),
        num_gpus=gpus,
        num_cpus=spec.cpus_per_actor,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
