"""Run one job from a validated spec: check everything cheap first, then hand shards to Ray and commit.

Order matters: the spec, the inputs (footers only), the output location and the model's config are checked
before Ray starts or any replica loads, so a bad job fails in seconds with one line naming the problem.
Shards already committed under the output (a rerun of an interrupted job) are skipped. The model actors
read and write the shards; this driver only receives a commit record per shard and writes its marker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

from .baseline import BaselineMissing, load_baseline
from .errors import JobError
from .inputs import inspect_inputs, make_shards
from .loading import check_model_source, model_fingerprint
from .outputs import DATA, ERRORS, OutputStore, ShardStats, part_name, spec_hash, sum_counts
from .portable import portable_schema
from .progress import Display, quiet_ray, start_board, stop_board, watch
from .schemas import JUDGE_FIELDS, data_schema, error_schema, result_names
from .spec import GenerateJob, ScoreJob, spec_record
from .storage import filesystem, redact_url, storage_options

log = logging.getLogger(__name__)
JUDGE_NAMES = {f.name for f in JUDGE_FIELDS}


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("fengshen-batch", "torch", "transformers", "ray", "pyarrow", "fsspec", "s3fs"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def _check_output_location(spec: ScoreJob | GenerateJob) -> None:
    in_fs, in_path = filesystem(spec.input, spec.storage)
    out_fs, out_path = filesystem(spec.output, spec.storage)
    a = in_fs.unstrip_protocol(in_path).rstrip("/")
    b = out_fs.unstrip_protocol(out_path).rstrip("/")
    if b == a or b.startswith(a + "/"):
        raise JobError(f"output {redact_url(spec.output)} is inside the input {redact_url(spec.input)}")


def _check_result_names(spec, input_names: list[str], read: list[str]) -> None:
    """An input column named like a result (re-scoring last night's output, a CCNet corpus with its own
    `perplexity` beside `ppl`) is refused before anything starts, with the two ways out."""
    results = result_names(spec)
    both = [c for c in read if c in results]
    if both:
        raise JobError(
            f"input column {both[0]!r} is read by this job and is also one of its result names: rename it"
        )
    clash = [n for n in results if n in input_names]
    if clash and not spec.result_prefix:
        names = ", ".join(clash)
        raise JobError(
            f"the input already has {'columns' if len(clash) > 1 else 'a column'} {names}, which this job "
            f"writes: leave the input's out with drop_columns: [{names}] "
            f"({' '.join('--drop-column ' + c for c in clash)}), or name the results apart with "
            "result_prefix: new_ (--result-prefix new_)"
        )
    prefixed = [
        spec.result_prefix + n
        for n in results
        if spec.result_prefix and spec.result_prefix + n in input_names
    ]
    if prefixed:
        raise JobError(f"the input already has a column {prefixed[0]!r}: choose another result_prefix")


class _Summary:
    """The running merge of the shards' summaries: sketches of score jobs, a judge job's counts of correct
    answers. O(bins) in memory, not O(shards)."""

    def __init__(self, kind: str):
        if kind in ("score", "generate"):
            from .report import sketches

            self.merge = sketches(kind).merge
        else:
            self.merge = sum_counts
        self.merged: dict | None = None
        self.complete = True  # False once a shard has none (committed by an older version)

    def add(self, summary: dict | None) -> None:
        if summary is None:
            self.complete = False
        else:
            self.merged = summary if self.merged is None else self.merge([self.merged, summary])


def _finish_kind(spec, store: OutputStore, manifest: dict, summary: dict | None, baseline=None) -> None:
    """What a kind adds once every shard is committed and before _SUCCESS: buckets and the report for
    scoring, the report for generation (both from the shards' merged summary, no pass over the rows),
    accuracy against labels for judging."""
    took = manifest.setdefault("finish_seconds", {})  # each step between the last shard and _SUCCESS
    t = time.time()
    if spec.kind == "score":
        from .report import build_report, merged_summary
        from .sketch import quantile

        # older shards (no summary in their markers): from the files
        summary = merged_summary(
            store, "score", spec.text_column, spec.report_by, [summary], prefix=spec.result_prefix,
            id_column=spec.id_column or "id",
        )  # fmt: skip
        if spec.bucket_thresholds:  # written with the data
            manifest["bucket_cutoffs"] = list(spec.bucket_thresholds)
        elif spec.bucket_quantiles:
            cutoffs = [quantile(summary[spec.bucket_by], q) for q in spec.bucket_quantiles]
            if None not in cutoffs:
                from . import pipeline

                files = store.files(DATA)
                prefix = spec.result_prefix
                summary["buckets"] = pipeline.rebucket(
                    store.url, spec.storage, files, cutoffs, prefix + spec.bucket_by, prefix + "bucket"
                )
                manifest["bucket_cutoffs"] = cutoffs
                took["buckets"] = round(time.time() - t, 3)
                t = time.time()
        threshold = spec.drift_threshold.model_dump() if spec.drift_threshold else None
        report = build_report(store, manifest, spec.report_by, [summary], baseline, threshold)
        if "drift" in report:
            manifest["drift"] = report["drift"]
        took["report"] = round(time.time() - t, 3)
    elif spec.kind == "judge" and spec.label_column:
        from .judging import accuracy, label_counts

        if summary is None:  # shards committed by a version that did not count: read their labels back
            columns = ["statements", "candidate_nll_sum", "candidate_token_count", spec.label_column]
            columns += [spec.answers_column] if spec.answers_column else []
            table = store.read(DATA, [spec.result_prefix + c if c in JUDGE_NAMES else c for c in columns])
            rows = table.rename_columns(columns).to_pylist()
            summary = label_counts(rows, spec.label_column, spec.answers_column)
        manifest["judge"] = accuracy(summary, spec.criterion)
        took["accuracy"] = round(time.time() - t, 3)
    elif spec.kind == "generate":
        from .sample_report import build_sample_report

        if spec.keep_best:  # samples generated and not kept: each good row made n samples and kept k of them
            n, k = spec.num_return_sequences, spec.keep_best
            manifest["counts"]["dropped_samples"] = manifest["counts"]["result_rows"] // k * (n - k)
        build_sample_report(store, manifest, spec.report_by, [summary])
        took["report"] = round(time.time() - t, 3)


def run_job(
    spec: ScoreJob | GenerateJob,
    progress: Callable[[str], None] = log.info,
    overwrite: bool = False,
    *,
    ray_progress: bool = False,
    live: bool | None = None,
) -> dict:
    """Run the job to completion and return its manifest (also written to OUTPUT/manifest.json).

    `progress` prints lines for the user; the live display (`live`: default, when stdout is a terminal)
    draws itself. `ray_progress`: Ray Data's own progress bars and INFO lines as well (then no live line).
    """
    started = time.time()
    startup: dict[str, float] = {}  # seconds of each start-up phase, for the manifest
    record = spec_record(spec)
    strings, lists, others = spec.input_columns()
    inputs = inspect_inputs(
        spec.input, spec.storage, strings[0] if strings else None, spec.id_column, tuple(lists), tuple(others),
        tuple(spec.number_columns()), spec.drop_columns,
    )  # fmt: skip
    _check_output_location(spec)
    _check_result_names(spec, inputs.schema.names, [c for c in [*strings, *lists, *others] if c])
    for source in (spec.model, getattr(spec, "reference_model", None)):
        if source:
            check_model_source(source, storage_options(source, spec.storage), spec.trust_remote_code)
    fingerprint, baseline, skipped = {}, None, None
    if spec.kind == "score":  # what a later job's baseline check compares (a few small reads)
        fingerprint = model_fingerprint(spec.model, storage_options(spec.model, spec.storage))
        if spec.baseline:  # read and checked now: a bad baseline fails before any model loads
            try:
                baseline = load_baseline(
                    spec.baseline, spec.storage, record, fingerprint, spec.baseline_check
                )
            except BaselineMissing as e:
                if spec.baseline_missing == "fail":
                    raise
                skipped = f"{e}; no comparison (baseline_missing: skip)"
                progress(skipped)
    shards = make_shards(inputs.files, spec.shard_rows)
    hash_ = spec_hash(record)
    store = OutputStore(spec.output, spec.storage)
    published = store.published_manifest()
    if published and not overwrite:
        if published.get("spec_hash") != hash_:
            raise JobError(
                f"output {redact_url(spec.output)} holds a finished job of a different configuration; "
                "use a new output or --overwrite"
            )
        progress(f"already complete: {redact_url(spec.output)} has _SUCCESS; nothing to do")
        return {"status": "already_complete"}
    # --overwrite over an existing output: build the new one beside it; the old one stays until it is done.
    target = store.staging() if overwrite and store.exists() else store
    committed = target.committed()
    if {m["spec_hash"] for m in committed.values()} - {hash_}:
        if not overwrite:
            raise JobError(
                f"output {redact_url(spec.output)} holds shards of a different job configuration; "
                "use a new output or --overwrite"
            )
        target.clear()  # an abandoned --overwrite of another configuration
        committed = {}
    todo = [s for s in shards if s.index not in committed]
    schemas = (data_schema(inputs.schema, spec), error_schema(inputs.schema))
    if committed and any(portable_schema(s) != s for s in schemas):
        # shards an older version committed may hold nanosecond timestamps Spark cannot read: rewritten
        # in the form this version writes, so that the resumed output reads as one (same spec, no refusal)
        from .writer import make_portable

        paths = [target._p(folder, f"{part_name(i)}.parquet") for i in committed for folder in (DATA, ERRORS)]
        changed = make_portable(target.url, spec.storage, paths, {DATA: schemas[0], ERRORS: schemas[1]})
        if changed:
            progress(f"rewrote {changed} files of earlier shards in the portable Parquet form")
    progress(
        f"{inputs.rows} rows in {len(inputs.files)} files, {len(shards)} shards "
        f"({len(shards) - len(todo)} already committed)"
    )
    startup["checks"] = time.time() - started

    quiet_ray(spec.address, ray_progress)
    from . import pipeline  # Ray is imported only once the job is known to be runnable

    t = time.time()
    address = spec.address or os.environ.get("RAY_ADDRESS")
    progress(f"joining Ray at {redact_url(address)} ..." if address else "starting a local Ray ...")
    pipeline.init_ray(spec.address, min_cpus=spec.actors[1] * spec.cpus_per_actor)
    startup["ray_start"] = time.time() - t
    gpus = (
        spec.gpus_per_actor if spec.gpus_per_actor is not None else (1.0 if pipeline.cluster_gpus() else 0.0)
    )
    by_index = {s.index: s for s in shards}
    summary = _Summary(spec.kind)
    for marker in committed.values():  # resumed shards: their summaries folded in, not kept
        summary.add(marker.pop("summary", None))
    stats = dict(committed)
    todo_rows = sum(s.stop - s.start for s in todo)
    display = Display(todo_rows, len(shards), len(committed), progress, live=False if ray_progress else live)
    rows_done = tokens_done = errors_done = 0
    run_start = time.time()
    last_commit = None
    # the actors' in-flight counts, read into the display from the first tokens on (and their phases before)
    board, stop_watching = start_board(), threading.Event()
    watcher = watch(board, display, spec.actors[0], spec.kind, stop_watching)
    try:
        records = pipeline.run_pipeline(
            spec, todo, inputs.id_column, gpus, target.url, schemas, ray_progress, board
        )
        for batch in records:
            if "first_batch" not in startup:
                startup["first_batch"] = time.time() - run_start
                startup.update(pipeline.actor_startup(batch, run_start))
            for rec in batch.to_pylist():
                index, raw = rec.pop("shard"), rec.pop("summary")
                if index in stats:  # a retried call may report a shard twice: commit it once
                    continue
                rec["error_kinds"] = json.loads(rec["error_kinds"] or "{}")
                shard_stats, shard_summary = ShardStats(**rec), json.loads(raw) if raw else None
                summary.add(shard_summary)
                target.commit(by_index[index], shard_stats, hash_, shard_summary)
                startup.setdefault("first_shard", time.time() - started)
                last_commit = time.time()
                stats[index] = shard_stats.__dict__
                rows_done += shard_stats.rows
                tokens_done += shard_stats.tokens
                errors_done += shard_stats.errors
            display.update(rows_done, tokens_done, errors_done, len(stats))
    finally:
        stop_watching.set()
        watcher.join(timeout=5)
        stop_board(board)
        display.close()
    missing = [s.index for s in shards if s.index not in stats]
    if missing:
        raise RuntimeError(f"{len(missing)} shards did not complete (first: {missing[:5]}); rerun to resume")

    wall = time.time() - started
    phases = ("plan", "actor_imports", "replica_load", "first_call_wait")
    compute_from = run_start + sum(startup[k] for k in phases) if all(k in startup for k in phases) else None
    totals = {k: sum(m[k] for m in stats.values()) for k in ("rows", "results", "errors", "tokens")}
    if totals["rows"] != inputs.rows:
        raise RuntimeError(f"row count mismatch: {totals['rows']} committed, {inputs.rows} in the input")
    manifest = {
        "status": "complete",
        "spec": record,
        "spec_hash": hash_,
        "model": redact_url(spec.model),
        "input_files": [{"file": redact_url(f.url), "rows": f.rows} for f in inputs.files],
        "counts": {
            "input_rows": inputs.rows,
            "result_rows": totals["results"],
            "error_rows": totals["errors"],
            # per error_kind; shards committed by a version that did not count them are left out
            "error_kinds": sum_counts([m.get("error_kinds", {}) for m in stats.values()]),
            "tokens": totals["tokens"],
        },
        "shards": len(shards),
        "resumed_shards": len(committed),
        "wall_seconds": round(wall, 3),
        # the model's part: the first actor's first call to the last shard committed (start-up excluded)
        **({"compute_seconds": round(last_commit - compute_from, 3)} if compute_from and last_commit else {}),
        "tokens_per_second": round(tokens_done / max(time.time() - run_start, 1e-9), 1),
        "startup": {k: round(v, 3) for k, v in startup.items()},
        "gpus_per_actor": gpus,
        "versions": _versions(),
        **({"model_fingerprint": fingerprint} if fingerprint else {}),
        **({"baseline_skipped": skipped} if skipped else {}),
    }
    cache_note = ""
    if spec.kind == "generate":
        counts = prefix_cache_counts(stats.values())
        manifest["counts"].update(counts)
        rate = counts["cached_prompt_tokens"] / max(1, counts["prompt_tokens"])
        manifest["prefix_cache_hit_rate"] = round(rate, 4)
        cache_note = f", prefix cache hit rate {rate:.0%}"
    if target is not store:
        t = time.time()
        store.replace_with(target)
        manifest["finish_seconds"] = {"replace_old_output": round(time.time() - t, 3)}
    _finish_kind(spec, store, manifest, summary.merged if summary.complete else None, baseline)
    store.publish(manifest)
    progress(
        f"done: {inputs.rows} rows ({totals['errors']} errors), {totals['tokens']} tokens, "
        f"{manifest['tokens_per_second']:,.0f} tokens/s{cache_note}, {wall:.1f}s -> {redact_url(spec.output)}"
    )
    if manifest.get("drift", {}).get("exceeded"):
        progress(f"drift against {baseline.url}: " + "; ".join(manifest["drift"]["breaches"]))
    return manifest


def prefix_cache_counts(shards) -> dict:
    """Prompt tokens of a generate job (one prefill per prompt), those the prefix cache supplied and those
    computed, added up from the shards' records (markers of older versions count nothing)."""
    prompt = sum(m.get("prompt_tokens", 0) for m in shards)
    cached = sum(m.get("cached_prompt_tokens", 0) for m in shards)
    return {
        "prompt_tokens": prompt,
        "cached_prompt_tokens": cached,
        "prefilled_prompt_tokens": prompt - cached,
    }
