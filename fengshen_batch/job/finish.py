"""The end of a job, once every shard is committed: the manifest (counts added up from the shards' records,
timings, versions), the kind's finish step (buckets and report, accuracy, ...), then manifest.json and
_SUCCESS, and the `done:` line."""

from __future__ import annotations

import contextlib
import time
from importlib.metadata import PackageNotFoundError, version

from ..io.outputs import sum_counts
from ..io.redact import redact_url
from ..kinds import get
from .checks import JobPlan
from .commit import Commits
from .dedup import dedup_output
from .resume import publish_exactly

STARTUP_BEFORE_COMPUTE = ("plan", "actor_imports", "replica_load", "first_call_wait")


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("fengshen-batch", "torch", "transformers", "ray", "pyarrow", "fsspec", "s3fs"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def check_complete(plan: JobPlan, commits: Commits) -> dict[str, int]:
    """Every shard committed and every input row accounted for; the totals of the shards' counts."""
    missing = commits.missing()
    if missing:
        raise RuntimeError(f"{len(missing)} shards did not complete (first: {missing[:5]}); rerun to resume")
    totals = {k: sum(m[k] for m in commits.stats.values()) for k in ("rows", "results", "errors", "tokens")}
    if totals["rows"] != plan.inputs.rows:
        raise RuntimeError(f"row count mismatch: {totals['rows']} committed, {plan.inputs.rows} in the input")
    return totals


def build_manifest(plan: JobPlan, commits: Commits, startup: dict, started: float, run_start: float,
                   gpus: float) -> dict:  # fmt: skip
    spec, inputs, stats = plan.spec, plan.inputs, commits.stats
    totals = check_complete(plan, commits)
    # the model's part: the first actor's first call to the last shard committed (start-up excluded)
    known = all(k in startup for k in STARTUP_BEFORE_COMPUTE)
    compute_from = run_start + sum(startup[k] for k in STARTUP_BEFORE_COMPUTE) if known else None
    compute = (
        {"compute_seconds": round(commits.last_at - compute_from, 3)}
        if compute_from and commits.last_at
        else {}
    )
    return {
        "status": "complete",
        "spec": plan.record,
        "spec_hash": plan.hash,
        "model": redact_url(spec.model),
        # each URL-prefix model's version (its files' sizes and ETags), the one every replica loaded
        "model_versions": {redact_url(k): v for k, v in plan.context.get("model_versions", {}).items()},
        "input_files": [
            {"file": redact_url(f.url), "rows": f.rows, "version": f.version} for f in inputs.files
        ],
        "counts": {
            "input_rows": inputs.rows,
            "result_rows": totals["results"],
            "error_rows": totals["errors"],
            # per error_kind; shards committed by a version that did not count them are left out
            "error_kinds": sum_counts([m.get("error_kinds", {}) for m in stats.values()]),
            "tokens": totals["tokens"],
        },
        "shards": len(plan.shards),
        "resumed_shards": len(plan.committed),
        "routes": plan.shards[0].routes,  # rows dealt to replicas by their prompt's header (few-shot sets)
        "wall_seconds": round(time.time() - started, 3),
        **compute,
        "tokens_per_second": round(commits.tokens / max(time.time() - run_start, 1e-9), 1),
        "startup": {k: round(v, 3) for k, v in startup.items()},
        "gpus_per_actor": gpus,
        "versions": versions(),
    }


def finish_job(plan: JobPlan, commits: Commits, manifest: dict, tasks: dict, progress) -> dict:
    """The kind's figures, the old output replaced (--overwrite), near-duplicates marked, the kind's finish
    step, then publish; returns the manifest as written. `tasks`: the cluster-wide steps (`map_files`: a
    function over slices of files in parallel; `near_duplicates`: workers/dedup.py)."""
    spec, store, kind = plan.spec, plan.store, get(plan.spec.kind)
    kind.add_to_manifest(spec, manifest, list(commits.stats.values()))
    if plan.lease is not None:  # still this run's output, before anything is removed, swapped or published
        plan.lease.check()
    publish_exactly(plan.target, set(commits.stats), dedup=getattr(spec, "dedup", None) is not None)
    if plan.target is not store:
        t = time.time()
        store.replace_with(plan.target)
        manifest["finish_seconds"] = {"replace_old_output": round(time.time() - t, 3)}
    context = {**plan.context, **tasks}
    if getattr(spec, "dedup", None) is not None:
        manifest["dedup"] = dedup_output(spec, store, context, progress)
        manifest["counts"]["duplicate_rows"] = manifest["dedup"]["removed"]
    kind.finish(spec, store, manifest, commits.summary.result, context)
    store.publish(manifest)
    counts = manifest["counts"]
    progress(
        f"done: {counts['input_rows']:,} rows ({counts['error_rows']:,} errors), {kind.token_note(manifest)}"
        f"{kind.done_note(manifest)}, "
        f"{manifest['wall_seconds']:.1f}s -> {redact_url(spec.output)}"
    )
    if store.fs.exists(store.path_to("report", "report.html")):  # every kind writes one
        progress(f"report: {redact_url(spec.output.rstrip('/'))}/report/report.html")
    for line in kind.report_lines(manifest, plan.context):
        progress(line)
    return manifest
