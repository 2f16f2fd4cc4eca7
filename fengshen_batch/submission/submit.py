"""Submit a job spec to a Ray cluster through the Ray Jobs API, from any directory, idempotently for nightly runs.

The spec travels inside the job's entrypoint, `python -m fengshen_batch run /dev/stdin <<'EOF' ... EOF`,
rather than in an uploaded working dir: one mechanism whether or not `--working-dir` uploads a folder as
well, nothing from the caller's disk leaves the machine unless asked, no package to store in the cluster's
GCS, and the job record (`ray job list`, the dashboard) shows exactly the spec that ran. Specs hold no
credentials (runtime_env env vars that look like them are refused), so the entrypoint may show them. The
shipped spec has `{date}` already filled in with the run date; the job's env still sets FENGSHEN_RUN_DATE
to that date, so the driver and anything else on the cluster agree with the submission id.

Paths in a spec (`input`, `output`, a local `model` directory) are resolved against the spec file's folder
when the head is on this machine (a loopback address), and refused for a remote cluster, whose workers cannot
see this machine's disk. Upload paths of the spec's own runtime_env (working_dir, py_modules, a pip
requirements file) are resolved against the spec's folder too: the client uploads them from here.

How the package reaches the cluster is `package`: `image` (installed in the cluster's image; a probe job
checks that before the real job is submitted), `py-modules` (this machine's copy as runtime_env py_modules:
code only, its dependencies must be in the image) or `pip` (runtime_env pip, pinned to this machine's
version). The submission id defaults to `<spec name>-<run date>`: an id that exists is reported as already
submitted before anything is probed or submitted, so a nightly schedule that fires twice never runs twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from ..errors import SubmitError
from .client import TERMINAL, connect, existing_status, explain, submit_job
from .plan import local_version, plan


def submit(
    spec_path: str,
    address: str,
    *,
    submission_id: str | None = None,
    working_dir: str | None = None,
    package: str = "image",
    echo: Callable[[str], None] = print,
) -> tuple[str, bool]:
    """Submit the spec; return (submission id, whether this call created the job)."""
    job = plan(spec_path, address, submission_id=submission_id, working_dir=working_dir, package=package)
    client = connect(address)

    def already(state) -> tuple[str, bool]:
        echo(f"job {job.submission_id} was already submitted ({state}); not submitting it again")
        return job.submission_id, False

    if (state := existing_status(client, job.submission_id, address)) is not None:
        return already(state)
    note = job.note
    if package == "image":
        from .probe import probe_image

        version = probe_image(client, address, job.runtime_env["env_vars"])
        mine = local_version()
        note = f"fengshen-batch {version} {note}" + (f" (this machine has {mine})" if version != mine else "")
    echo(f"package: {note}")
    try:
        submit_job(
            client, entrypoint=job.entrypoint, submission_id=job.submission_id,
            runtime_env=job.runtime_env, metadata=job.metadata,
            entrypoint_num_cpus=1,  # the driver only coordinates: no GPU
        )  # fmt: skip
    except Exception as e:
        if "already exists" in str(e):  # submitted by someone else since the check above
            return already(client.get_job_status(job.submission_id))
        raise SubmitError(explain(e, address)) from None
    echo(f"submitted {job.submission_id} to {address}")
    return job.submission_id, True


def wait(address: str, submission_id: str, echo: Callable[[str], None] = print, poll_s: float = 1.0) -> str:
    """Follow the job's logs until it ends; return its final status."""
    client = connect(address)

    async def follow():
        async for lines in client.tail_job_logs(submission_id):
            echo(lines.rstrip("\n"))

    with contextlib.suppress(Exception):  # the log stream is best effort; the status below is what counts
        asyncio.run(follow())
    while (final := str(client.get_job_status(submission_id))) not in TERMINAL:
        time.sleep(poll_s)
    if final != "SUCCEEDED":
        info = client.get_job_info(submission_id)
        echo(f"job {submission_id} {final}: {info.message or ''}".rstrip())
    return final


def status(address: str, submission_id: str) -> str:
    return str(connect(address).get_job_status(submission_id))


def logs(address: str, submission_id: str) -> str:
    return connect(address).get_job_logs(submission_id)


def stop(address: str, submission_id: str) -> bool:
    return connect(address).stop_job(submission_id)
