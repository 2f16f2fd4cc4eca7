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
import copy
import ipaddress
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from . import __version__
from .errors import SubmitError
from .loading import _HUB_ID  # the same test as loading.localize's, so submit and the driver agree
from .spec import SpecError, build_spec, read_spec_fields, run_date

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 180  # a head that has just started, on a busy machine, can take minutes
PACKAGES = ("image", "py-modules", "pip")
PATH_FIELDS = ("model", "input", "output")
# Uploads (working dir, py_modules) leave these out: environments, caches, outputs of local runs.
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
_HEREDOC = "FENGSHEN_SPEC"
_REMOTE_HINT = (
    "its workers cannot see this machine's disk; copy the data to a bucket and give its URL (s3://, gs://)"
)


@dataclass
class Plan:
    """Everything about one submission that needs no network."""

    submission_id: str
    entrypoint: str
    runtime_env: dict
    metadata: dict
    note: str  # how the package reaches the cluster, for the user


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


def is_local_address(address: str) -> bool:
    """Whether the head is on this machine (a loopback host), so that it sees this machine's paths."""
    host = urlsplit(address if "://" in address else f"http://{address}").hostname or ""
    if address == "auto" or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_url(value: str) -> bool:
    return "://" in value  # file:// included: a path as the cluster's nodes see it, passed unchanged


def _is_local_path(field: str, value: str, spec_dir: Path) -> bool:
    """Whether a spec field names a path on this machine (as loading.localize tells a model dir from a hub id)."""
    if _is_url(value):
        return False
    if field == "model" and _HUB_ID.match(value) and not value.startswith((".", "/", "~")):
        return (spec_dir / value).is_dir()  # a hub id, unless such a directory lies next to the spec
    return True


def _absolute(value: str, spec_dir: Path) -> str:
    resolved = os.path.normpath(spec_dir / Path(value).expanduser())  # keeps symlinks: resolved where used
    return resolved + "/" if value.endswith("/") and not resolved.endswith("/") else resolved


def resolve_paths(fields: dict, spec_dir: Path, address: str) -> dict:
    """The spec's local paths made absolute against its folder (local head), or refused (remote cluster)."""
    local = {f: fields[f] for f in PATH_FIELDS if _is_local_path(f, str(fields[f]), spec_dir)}
    if local and not is_local_address(address):
        named = ", ".join(f"{f}: {v}" for f, v in local.items())
        paths = "local paths" if len(local) > 1 else "a local path"
        raise SubmitError(
            f"the spec names {paths} ({named}), but the cluster at {address} is remote and {_REMOTE_HINT}"
        )
    return {**fields, **{f: _absolute(str(v), spec_dir) for f, v in local.items()}}


def _check_runtime_env(runtime_env: dict) -> None:
    leaked = [k for k in (runtime_env.get("env_vars") or {}) if any(h in k.upper() for h in _SECRET_HINTS)]
    if leaked:
        raise SpecError(
            f"runtime_env.env_vars {leaked} look like credentials; they would be stored in Ray's job metadata. "
            "Give the cluster's nodes credentials through their environment or instance role instead."
        )


def _requirement_names(entries) -> set[str]:
    names = set()
    for entry in entries or []:
        if m := re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", str(entry)):
            names.add(re.sub(r"[-_.]+", "-", m.group(1).lower()))
    return names


def _pip_list(pip, spec_dir: Path) -> list[str]:
    """The spec's runtime_env pip (list, {packages: [...]} or a requirements file) as requirement lines."""
    if isinstance(pip, dict):
        return list(pip.get("packages") or [])
    if isinstance(pip, str):
        try:
            lines = (spec_dir / pip).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise SpecError(f"cannot read the runtime_env requirements file {pip}: {e.strerror}") from None
        return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    return list(pip or [])


def build_runtime_env(
    spec_env: dict, spec_dir: Path, working_dir: str | None, package: str
) -> tuple[dict, str]:
    """The job's runtime_env (the spec's own, merged with what submit adds) and a note on the package."""
    env = copy.deepcopy(spec_env)
    _check_runtime_env(env)
    # The client uploads these from this machine: relative to the spec, like the spec's other paths.
    if isinstance(env.get("working_dir"), str) and not _is_url(env["working_dir"]):
        env["working_dir"] = _absolute(env["working_dir"], spec_dir)
    if env.get("py_modules"):
        env["py_modules"] = [m if _is_url(str(m)) else _absolute(str(m), spec_dir) for m in env["py_modules"]]
    if isinstance(env.get("pip"), str):
        env["pip"] = _absolute(env["pip"], spec_dir)
    if working_dir is not None:
        wd = str(Path(working_dir).resolve())
        if env.get("working_dir") not in (None, wd):
            raise SubmitError(
                f"--working-dir {wd} and the spec's runtime_env.working_dir {env['working_dir']} differ: give one"
            )
        env["working_dir"] = wd

    pip = _pip_list(env.get("pip"), spec_dir)
    ships = [
        k for k in ("pip", "uv") if "fengshen-batch" in _requirement_names(_pip_list(env.get(k), spec_dir))
    ]
    ships += ["py_modules"] * any(Path(str(m)).name == "fengshen_batch" for m in env.get("py_modules") or [])
    if ships:
        raise SubmitError(
            f"the spec's runtime_env.{ships[0]} already ships fengshen-batch: leave it out and choose how the "
            "package reaches the cluster with --package (image, py-modules or pip)"
        )
    version = local_version()
    if package == "py-modules":
        package_dir = str(Path(__file__).resolve().parent)
        env["py_modules"] = [package_dir, *(env.get("py_modules") or [])]
        note = f"fengshen-batch {version} from this machine (py_modules {package_dir})"
    elif package == "pip":
        if other := [k for k in ("conda", "uv") if env.get(k)]:
            raise SubmitError(
                f"--package pip cannot be combined with the spec's runtime_env.{other[0]} (Ray takes one of pip, "
                "uv, conda): use --package image or py-modules, or add fengshen-batch to that environment"
            )
        pin = f"fengshen-batch=={version}"
        env["pip"] = (
            {**env["pip"], "packages": [*pip, pin]} if isinstance(env.get("pip"), dict) else [*pip, pin]
        )
        note = f"{pin} installed by pip on the cluster (runtime_env pip)"
    elif package == "image":
        note = "from the cluster image"  # completed with its version once the probe has run
    else:
        raise SubmitError(f"--package must be one of {', '.join(PACKAGES)}, got {package!r}")
    if env.get("working_dir") or env.get("py_modules"):
        env.setdefault("excludes", EXCLUDES)
    # The driver resolves `{date}` with the same run date as the submission id, whenever it starts.
    env["env_vars"] = {"FENGSHEN_RUN_DATE": run_date(), **(env.get("env_vars") or {})}
    return env, note


def local_version() -> str:
    """This machine's fengshen-batch version (the installed distribution's, else the package's)."""
    from importlib import metadata

    try:
        return metadata.version("fengshen-batch")
    except metadata.PackageNotFoundError:
        return __version__


def plan(
    spec_path: str,
    address: str,
    *,
    submission_id: str | None = None,
    working_dir: str | None = None,
    package: str = "image",
) -> Plan:
    """Validate the spec and build the job (entrypoint, runtime_env), without touching the network."""
    fields = read_spec_fields(spec_path)
    spec = build_spec(fields)  # validated here, before anything reaches the cluster
    sid = submission_id or default_submission_id(spec.name)
    spec_dir = Path(spec_path).resolve().parent
    fields = resolve_paths(fields, spec_dir, address)  # the same fields, local paths rewritten
    runtime_env, note = build_runtime_env(spec.runtime_env, spec_dir, working_dir, package)
    text = yaml.safe_dump(fields, sort_keys=False, allow_unicode=True)
    if _HEREDOC in text.splitlines():
        raise SpecError(f"the spec has a line reading {_HEREDOC}, which ends the inline spec: change it")
    entrypoint = f"python -m fengshen_batch run /dev/stdin <<'{_HEREDOC}'\n{text}{_HEREDOC}"
    metadata = {"fengshen_batch.kind": spec.kind, "fengshen_batch.spec": str(Path(spec_path).resolve())}
    return Plan(sid, entrypoint, runtime_env, metadata, note)


def _submit_job(client, **kwargs) -> None:
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
        raise SubmitError(_explain(e, address)) from None


def _forget(client, address: str, job_id: str, rounds: int = 5) -> None:
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
    client = _client(address)

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
        _submit_job(
            client, entrypoint=job.entrypoint, submission_id=job.submission_id,
            runtime_env=job.runtime_env, metadata=job.metadata,
            entrypoint_num_cpus=1,  # the driver only coordinates: no GPU
        )  # fmt: skip
    except Exception as e:
        if "already exists" in str(e):  # submitted by someone else since the check above
            return already(client.get_job_status(job.submission_id))
        raise SubmitError(_explain(e, address)) from None
    echo(f"submitted {job.submission_id} to {address}")
    return job.submission_id, True


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
