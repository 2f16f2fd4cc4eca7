"""Run one job from a validated spec, in phases: check and plan (before Ray starts), start Ray, run and
commit the shards, finish and publish.

Order matters: the spec, the inputs (footers only), the output location and the model's config are checked
before Ray starts or any replica loads, so a bad job fails in seconds with one line naming the problem.
Shards already committed under the output (a rerun of an interrupted job) are skipped. The model actors
read and write the shards; this driver only receives a commit record per shard and writes its marker.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from ..errors import JobError
from ..io.outputs import OutputStore
from ..io.redact import redact_url
from ..kinds import get
from ..spec import GenerateJob, JudgeJob, ScoreJob
from .checks import check_job, plan_output
from .commit import run_shards
from .display import quiet_ray
from .finish import build_manifest, finish_job
from .lease import OutputLease

log = logging.getLogger(__name__)


def run_job(
    spec: ScoreJob | GenerateJob | JudgeJob,
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
    record, inputs, context = check_job(spec, progress)
    # one run at a time writes an output: held from here to the publish (lease.py)
    with OutputLease(OutputStore(spec.output, spec.storage), spec.name or spec.kind) as lease:
        plan = plan_output(spec, record, inputs, context, overwrite, progress)
        if plan is None:
            return {"status": "already_complete"}
        plan.lease = lease
        startup = {"checks": time.time() - started}  # seconds of each start-up phase, for the manifest

        gpus = start_ray(spec, ray_progress, progress, startup)
        from ..workers.reuse import find_reused

        get(spec.kind).before_shards(plan, gpus, {"find_reused": find_reused}, progress)
        commits, run_start = run_shards(plan, gpus, progress, startup, started, ray_progress, live)

        from ..workers.cluster import map_files
        from ..workers.dedup import near_duplicates

        manifest = build_manifest(plan, commits, startup, started, run_start, gpus)
        tasks = {"map_files": map_files, "near_duplicates": near_duplicates}
        return finish_job(plan, commits, manifest, tasks, progress)


def start_ray(spec, ray_progress: bool, progress, startup: dict) -> float:
    """Join the spec's Ray (or start an embedded one); returns the GPUs each actor gets."""
    quiet_ray(spec.address, ray_progress)
    from ..workers import cluster  # Ray is imported only once the job is known to be runnable

    t = time.time()
    address = spec.address or os.environ.get("RAY_ADDRESS")
    progress(f"joining Ray at {redact_url(address)} ..." if address else "starting a local Ray ...")
    try:
        cluster.init_ray(spec.address, min_cpus=spec.actors[1] * spec.cpus_per_actor)
    except Exception as e:  # Ray's own errors are pages of traceback: the first line says what happened
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        what = f"cannot join Ray at {redact_url(address)}" if address else "the local Ray did not start"
        hint = (
            "is the cluster up and the address right?" if address else "the machine may be overloaded; retry"
        )
        raise JobError(f"{what}: {type(e).__name__}: {first[:300]} ({hint})") from None
    startup["ray_start"] = time.time() - t
    if spec.gpus_per_actor is not None:
        return spec.gpus_per_actor
    return 1.0 if cluster.cluster_gpus() else 0.0
