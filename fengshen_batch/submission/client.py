"""The Ray Jobs API as submit uses it: a client, errors explained in one line, a submission retried while a new
head's job agent starts, and a job stopped and deleted so that it stays gone."""

from __future__ import annotations

import contextlib
import time

from ..errors import SubmitError

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


AGENT_WAIT_S = 180  # a head that has just started, on a busy machine, can take minutes


def connect(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:
        raise SubmitError(explain(e, address)) from None


def explain(error: Exception, address: str) -> str:
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


def submit_job(client, **kwargs) -> None:
    """client.submit_job, retried while a head that has just started brings up its job agent."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            client.submit_job(**kwargs)
            return
        except Exception as e:
            if "try again later" in str(e) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise


def existing_status(client, submission_id: str, address: str) -> str | None:
    """The status of the job with this id, or None if the cluster has none."""
    try:
        return str(client.get_job_info(submission_id).status)
    except Exception as e:
        if "status code 404" in str(e):
            return None
        raise SubmitError(explain(e, address)) from None


def forget(client, address: str, job_id: str, rounds: int = 5) -> None:
    """Stop and delete a job. Ray's job monitor notices a job's supervisor actor gone up to a second or so after
    the job ends and, if the record is already deleted, writes it again (as failed): so wait that second out,
    and delete again until the record stays gone."""
    with contextlib.suppress(Exception):
        if existing_status(client, job_id, address) not in TERMINAL:
            client.stop_job(job_id)
    for _ in range(rounds):
        time.sleep(1.5)
        with contextlib.suppress(Exception):
            if existing_status(client, job_id, address) is None:
                return
            client.delete_job(job_id)
