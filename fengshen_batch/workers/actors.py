"""The Ray actors, thin: each loads its replica once in `__init__` and feeds its kind's work in `__call__`.
`ModelActor` (a job's) reads, computes and writes whole shards and returns their commit records;
`RowsActor` (the processors') computes over a user's Dataset batches and returns them with the results."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import replace

import pyarrow as pa
import ray

from ..io.inputs import ID_COLUMN, Shard, read_shard
from ..io.redact import install_log_redaction
from ..kinds import get
from ..kinds.schemas import internal_schemas
from ..spec import build_spec
from .board import Reporter
from .reuse import shard_reused

STARTUP_KEY = b"fengshen.actor_startup"  # schema metadata of an actor's output: its start-up timestamps


COMMIT_SCHEMA = pa.schema(
    [("shard", pa.int64()), ("rows", pa.int64()), ("results", pa.int64()), ("errors", pa.int64()),
     ("tokens", pa.int64()), ("error_kinds", pa.string()), ("prompt_tokens", pa.int64()),
     ("cached_prompt_tokens", pa.int64()), ("truncated_prompts", pa.int64()),
     ("truncated_prompt_tokens", pa.int64()), ("reused", pa.int64()), ("reused_tokens", pa.int64()),
     ("reused_from", pa.string()), ("summary", pa.string())]
)  # fmt: skip


def compute_lock(spec):
    """What keeps an actor's replica to one computing call at a time (slice-by-slice kinds: the other call
    reads or writes meanwhile); a whole-shard kind needs none: its engine thread interleaves the calls."""
    return contextlib.nullcontext() if get(spec.kind).whole_shard else threading.Lock()


def load_replicas(spec, model_versions: dict | None = None):
    """In an actor: the spec's model (and reference model) on this actor's device, and the kind's engine
    (generation's, in its thread); returns (Replicas, the token budget to start from, when the imports were
    done). `model_versions`: the version of each URL-prefix model the driver saw (every replica loads it)."""
    import torch

    from ..io.storage import storage_options
    from ..kinds.process import Replicas
    from ..model.load import load_replica

    imported_at = time.time()
    on_gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
    if not on_gpu:
        # A kind that computes in its engine thread loads with one intra-op thread here, so that this thread
        # never starts an OpenMP team of its own: with two teams' threads on as many cores, libgomp stops
        # spinning between parallel regions and every region waits on a futex (the CPU decode kernel ran 2x
        # slower). The engine thread sets cpus_per_actor threads for itself.
        torch.set_num_threads(1 if get(spec.kind).whole_shard else max(1, int(spec.cpus_per_actor)))

    def load(source: str):
        return load_replica(
            source,
            device="cuda" if on_gpu else "cpu",
            dtype=spec.dtype,
            trust_remote_code=spec.trust_remote_code,
            storage_options=storage_options(source, spec.storage),
            expected_version=(model_versions or {}).get(source),
        )

    reference = getattr(spec, "reference_model", None)
    replicas = Replicas(load(spec.model), reference=load(reference) if reference else None)
    replicas.engine = get(spec.kind).engine(spec, replicas.model)
    return replicas, spec.token_budget or (16384 if on_gpu else 2048), imported_at


class ModelActor:
    """One model replica on one device (a GPU when the actor was given one, else the CPU).

    A call takes shard descriptors and returns their commit records; the rows stay in this process.
    Generate jobs: the replica's one engine runs in a background thread; several shards are in flight in
    this actor at once (threaded calls), each submitting its prompts to that engine and waiting for them.
    """

    def __init__(
        self,
        spec: dict,
        id_column: str | None,
        output: str,
        schemas: tuple[pa.Schema, pa.Schema],
        board=None,
        model_versions: dict | None = None,
    ):
        init_at = time.time()
        install_log_redaction()
        self.spec = build_spec(spec)
        self.kind = get(self.spec.kind)
        self.reporter = Reporter(board, self.spec)  # says "loading" to the driver's line
        self.replicas, self.token_budget, imported_at = load_replicas(self.spec, model_versions)
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
        from ..io.writer import split_results, write_shard_files
        from ..kinds.generation import PromptUsage
        from ..kinds.process import process_table
        from ..kinds.rows import first_errors, id_errors, invalid_utf8

        spec = self.spec
        table = read_shard(shard, spec.storage, self.id_column, spec.drop_columns)
        table = table.rename_columns([self.renamed.get(n, n) for n in table.column_names])
        if shard.routes > 1:  # one route's share of the range: the rows whose prompt header it holds
            ids = [str(i) for i in table.column(self.id_field).to_pylist()]
            routes = self.kind.route_rows(spec, table, ids, shard.routes)
            table = table.filter(pa.array([r == shard.route for r in routes], pa.bool_()))
        table, bad_text = invalid_utf8(table)
        # ids from the input are checked across the whole shard (derived ones are unique by construction)
        bad_ids = id_errors(table.column(self.id_field).to_pylist()) if self.id_column else None
        bad_ids = first_errors(bad_text, bad_ids)
        # A whole-shard kind (generation) gives the engine every row at once (it schedules per step); the
        # others run slices of batch_size rows (one engine call each, and one row-by-row retry at most that
        # large), one call computing while the other reads or writes its shard.
        step = max(1, len(table)) if self.kind.whole_shard else spec.batch_size
        reused, counts = shard_reused(spec, self.output, shard.index, table, bad_ids)  # score jobs' `reuse`
        parts, usage = [], PromptUsage()
        with self.lock:
            for start in range(
                0, max(1, len(table)), step
            ):  # an empty shard: one empty slice, for its schema
                part, self.token_budget = process_table(
                    self.replicas, spec, table.slice(start, step), self.id_field, self.token_budget,
                    bad_ids[start : start + step] if bad_ids else None, usage,
                    reused[start : start + step] if reused else None,
                )  # fmt: skip
                parts.append(part)
                self._count(part)
        rows = pa.concat_tables(parts)
        data, errors, stats = split_results(
            shard, rows, self.kind.tokens, self.internal_data, self.internal_errors, len(table)
        )
        if counts:  # the model's tokens are those it computed
            stats = replace(stats, tokens=stats.tokens - counts["reused_tokens"], **counts)
        data = self.kind.prepare_data(spec, data)
        # what the driver adds up across shards instead of reading the output back
        summary = self.kind.summarize(spec, data, self.renamed, self.id_field)
        signatures = (
            self.kind.signatures(spec, data, self.renamed, shard.index)
            if getattr(spec, "dedup", None)
            else None
        )
        # the names the files have: input columns as they were, results with the spec's result_prefix
        names = self.data_schema.names + [spec.result_prefix + "bucket"] * ("bucket" in data.column_names)
        data, errors = data.rename_columns(names), errors.rename_columns(self.error_schema.names)
        write_shard_files(self.output, spec.storage, shard, data, errors, signatures)
        return {
            "shard": shard.index,
            **stats.__dict__,
            "error_kinds": json.dumps(stats.error_kinds),
            "reused_from": json.dumps(stats.reused_from),
            "prompt_tokens": usage.prompt_tokens,
            "cached_prompt_tokens": usage.cached_tokens,
            "truncated_prompts": usage.truncated_prompts,
            "truncated_prompt_tokens": usage.truncated_tokens,
            "summary": None if summary is None else json.dumps(summary),
        }

    def _count(self, part: pa.Table) -> None:
        """A slice's finished rows, errors and tokens for the progress line (an engine counts its prompts,
        samples and tokens itself: then only the rows that never reached it)."""
        import pyarrow.compute as pc

        failed = pc.is_valid(part.column("error_kind"))
        errors = pc.sum(failed).as_py() or 0  # one row each
        if self.replicas.engine is not None:
            self.reporter.add(rows=errors, errors=errors)
            return
        tokens = self.kind.tokens(part.filter(pc.invert(failed)))
        self.reporter.add(rows=part.num_rows, tokens=tokens, errors=errors)  # one output row per input row


class RowsActor:
    """The processors' actor (`processors.py`): the job's replica, engine and per-row work over a user's Dataset
    batch, returned with the result columns and `error_kind`/`error_message` appended (generation: one row per
    sample). No files, markers or summaries: the user's pipeline owns what comes next."""

    def __init__(self, spec: dict):
        install_log_redaction()
        self.spec = build_spec(spec)
        self.replicas, self.token_budget, _ = load_replicas(self.spec)
        self.lock = compute_lock(self.spec)

    def __call__(self, table: pa.Table) -> pa.Table:
        from ..errors import InputError
        from ..kinds.process import process_table
        from ..kinds.rows import first_errors, id_errors, invalid_utf8
        from ..kinds.schemas import ERROR_FIELDS, result_fields

        spec, id_column = self.spec, self.spec.id_column or ID_COLUMN
        if spec.drop_columns:
            table = table.drop_columns([c for c in spec.drop_columns if c in table.column_names])
        table, bad_text = invalid_utf8(table)
        has_ids = id_column in table.column_names
        if has_ids:
            bad_ids = id_errors(table.column(id_column).to_pylist())  # within the batch
        elif get(spec.kind).needs_ids or spec.id_column:
            raise InputError(
                f"id column {id_column!r} not in the dataset (columns: {', '.join(table.column_names)}): "
                "samples are seeded by row id; add one or name it with id_column"
            )
        else:  # scoring and judging use ids only to name rows: a position in the batch will do
            bad_ids, id_column = None, "_id"
            table = table.append_column(id_column, pa.array([str(i) for i in range(len(table))]))
        with self.lock:
            out, self.token_budget = process_table(
                self.replicas, spec, table, id_column, self.token_budget, first_errors(bad_text, bad_ids)
            )
        if not has_ids:
            out = out.drop_columns([id_column])
        # results, then the error columns, end the table: results get the spec's result_prefix
        results = [spec.result_prefix + f.name for f in result_fields(spec)]
        inputs = out.column_names[: -len(results) - len(ERROR_FIELDS)]
        return out.rename_columns([*inputs, *results, *(f.name for f in ERROR_FIELDS)])


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
