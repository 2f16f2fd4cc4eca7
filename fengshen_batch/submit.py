"""Submit a job spec to a Ray cluster through the Ray Jobs API, idempotently for nightly runs.

The entrypoint is `python -m fengshen_batch run SPEC` in the uploaded working dir, on a driver that asks for
CPU only. The submission id defaults to `<spec name>-<run date>`: Ray refuses a second job with the same id,
so a nightly schedule that fires twice, or is retried, never runs the job twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from .spec import SpecError, load_spec, run_date

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 180  # a head that has just started, on a busy machine, can take minutes
# Working-dir uploads leave these out: environments, caches, outputs of local runs.
EXCLUDES = [
    ".venv/",
    ".git/",
    "**/__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
    "demo-output/",
    "*.egg-info/",
]
# Spec runtime_env keys that would put credentials into Ray's job metadata.
_SECRET_HINTS = ("SECRET", "TOKEN", "PASSWORD", "CREDENTIAL", "ACCESS_KEY")


class SubmitError(RuntimeError):
    """Submission failed for a reason the user can fix; the message says what to set or do."""


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:
        raise SubmitError(_explain(e, address)) from None


def _explain(error: Exception, address: str) -> str:
    text = f"{type(error).__name__}: {error}"
    if "401" in text or "403" in text or "Authentication" in text or "Unauthorized" in text:
        return (
            f"Ray at {address} refused the request: token authentication failed. Set RAY_AUTH_MODE=token and "
            "give the cluster's token as RAY_AUTH_TOKEN, or in the file RAY_AUTH_TOKEN_PATH (default "
            "~/.ray/auth_token); `ray get-auth-token` prints it on the head node."
        )
    if "Connection" in text or "connect" in text:
        return f"cannot reach the Ray dashboard at {address} (is it the head's :8265 address?): {text}"
    return text


def default_submission_id(name: str | None) -> str:
    """NAME-YYYYMMDD of the run date (FENGSHEN_RUN_DATE, else today in UTC)."""
    if not name:
        raise SpecError(
            "the spec has no `name`: give it one (submission ids are NAME-DATE) or pass --submission-id"
        )
    return f"{name}-{run_date().replace('-', '')}"


def _check_runtime_env(runtime_env: dict) -> None:
    leaked = [k for k in (runtime_env.get("env_vars") or {}) if any(h in k.upper() for h in _SECRET_HINTS)]
    if leaked:
        raise SpecError(
            f"runtime_env.env_vars {leaked} look like credentials; they would be stored in Ray's job metadata. "
            "Give the cluster's nodes credentials through their environment or instance role instead."
        )


def submit(
    spec_path: str,
    address: str,
    *,
    submission_id: str | None = None,
    working_dir: str = ".",
    echo: Callable[[str], None] = print,
) -> tuple[str, bool]:
    """Submit the spec; return (submission id, whether this call created the job)."""
    spec = load_spec(spec_path)  # validated here, before anything reaches the cluster
    sid = submission_id or default_submission_id(spec.name)
    root = Path(working_dir).resolve()
    try:
        rel = Path(spec_path).resolve().relative_to(root)
    except ValueError:
        raise SpecError(
            f"the spec {spec_path} must be inside the working dir {root}, which is uploaded"
        ) from None
    runtime_env = {**spec.runtime_env}
    _check_runtime_env(runtime_env)
    # The driver resolves `{date}` with the same run date as the submission id, whenever it starts.
    runtime_env["env_vars"] = {"FENGSHEN_RUN_DATE": run_date(), **(runtime_env.get("env_vars") or {})}
    runtime_env.setdefault("working_dir", str(root))
    runtime_env.setdefault("excludes", EXCLUDES)

    client = _client(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(
                entrypoint=f"python -m fengshen_batch run {rel.as_posix()}",
                submission_id=sid,
                runtime_env=runtime_env,
                entrypoint_num_cpus=1,  # the driver only coordinates: no GPU
                metadata={"fengshen_batch.kind": spec.kind, "fengshen_batch.spec": rel.as_posix()},
            )
            break
        except Exception as e:
            if "already exists" in str(e):
                status = client.get_job_status(sid)
                echo(f"job {sid} was already submitted ({status}); not submitting it again")
                return sid, False
            # A head that has just started answers this until its job agent is up.
            if "try again later" in str(e) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise SubmitError(_explain(e, address)) from None
    echo(f"submitted {sid} to {address}")
    return sid, True


def wait(address: str, submission_id: str, echo: Callable[[str], None] = print, poll_s: float = 1.0) -> str:
    """Follow the job's logs until it ends; return its final status."""
    client = _client(address)

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
    return str(_client(address).get_job_status(submission_id))


def logs(address: str, submission_id: str) -> str:
    return _client(address).get_job_logs(submission_id)


def stop(address: str, submission_id: str) -> bool:
    return _client(address).stop_job(submission_id)
