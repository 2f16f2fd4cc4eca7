"""The image probe: before `submit --package image` sends a job, a tiny job checks that the cluster's python has
fengshen-batch and every module the job will import, and reports the version there. It is deleted afterwards,
so it never shows among the cluster's jobs."""

from __future__ import annotations

import time
import uuid

from ..errors import SubmitError
from .client import TERMINAL, explain, forget, submit_job
from .plan import local_version

PROBE_WAIT_S = 120  # the probe asks for no CPU, so it never queues behind running jobs
_PROBE_MARK = "fengshen-probe-version:"
_PROBE_MISSING = "fengshen-probe-missing:"
# What a job imports on the cluster, top-level names (looked up without importing, so one missing dependency
# cannot hide another): a stray `fengshen_batch/` folder in the head's working directory satisfies `import
# fengshen_batch` while the cluster's python may lack what the job needs next.
PROBE_MODULES = ("fengshen_batch", "pyarrow", "ray", "torch", "tokenizers", "safetensors", "fsspec", "s3fs",
                 "pydantic", "yaml", "click", "matplotlib", "tqdm", "filelock")  # fmt: skip


def probe_image(
    client,
    address: str,
    env_vars: dict,
    module: str = "fengshen_batch",
    timeout_s: float = PROBE_WAIT_S,
    needs: tuple[str, ...] = PROBE_MODULES,
) -> str:
    """Check with a tiny job that the cluster's `python` has every module of `needs` and imports `module`;
    return its version. The probe job is deleted afterwards, so it never shows among the cluster's jobs."""
    probe_id = f"fengshen-probe-{uuid.uuid4().hex[:12]}"
    code = (
        f"import importlib.util as u; bad = [n for n in {list(needs)!r} if u.find_spec(n) is None]; "
        f"print({_PROBE_MISSING!r}, ','.join(bad)); "
        f"import {module} as m; print({_PROBE_MARK!r}, getattr(m, '__version__', 'unknown'))"
    )
    try:
        submit_job(
            client, entrypoint=f'python -c "{code}"', submission_id=probe_id,
            runtime_env={"env_vars": env_vars}, entrypoint_num_cpus=0,
        )  # fmt: skip
    except Exception as e:
        raise SubmitError(explain(e, address)) from None
    try:
        deadline = time.monotonic() + timeout_s
        while (state := str(client.get_job_status(probe_id))) not in TERMINAL:
            if time.monotonic() > deadline:
                raise SubmitError(
                    f"the probe job {probe_id}, which checks that the cluster's image has fengshen-batch, did not "
                    f"finish within {timeout_s:.0f}s; submit with --package py-modules or pip to skip it"
                )
            time.sleep(0.5)
        output = client.get_job_logs(probe_id)
    finally:
        forget(client, address, probe_id)
    found = [
        line.removeprefix(_PROBE_MARK).strip() for line in output.splitlines() if line.startswith(_PROBE_MARK)
    ]
    missing = [
        name
        for line in output.splitlines()
        if line.startswith(_PROBE_MISSING)
        for name in line.removeprefix(_PROBE_MISSING).strip().split(",")
        if name
    ]
    if missing:
        raise SubmitError(
            f"the cluster's python lacks {', '.join(missing)}, which the job imports (a probe job looked for "
            f"them): install fengshen-batch with its dependencies in the image (cluster/Dockerfile), or submit "
            f"with --package pip (fengshen-batch=={local_version()} and its dependencies)"
        )
    if state == "SUCCEEDED" and found:
        return found[-1]
    errors = [line.strip() for line in output.splitlines() if "Error" in line]
    why = errors[-1] if errors else f"the probe job {state}"
    raise SubmitError(
        f"fengshen-batch is not installed in the cluster's image (a probe job's `import {module}` failed: {why}); "
        "install it in the image (cluster/Dockerfile), or submit with --package py-modules (this machine's copy) "
        f"or --package pip (fengshen-batch=={local_version()})"
    )
