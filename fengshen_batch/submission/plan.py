"""Everything about a submission that needs no network: the submission id, the spec's paths resolved or
refused, the runtime_env (how the package reaches the cluster), and the entrypoint that carries the spec."""

from __future__ import annotations

import copy
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from .. import __version__
from ..errors import SubmitError
from ..io.redact import SECRET_NAME, has_secret, redact_text, redact_url
from ..io.spec_files import read_spec_fields, run_date
from ..model.source import HUB_ID  # the same test as model.source.localize's, so submit and the driver agree
from ..spec import SpecError, build_spec

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
    """Whether a spec field names a path on this machine (as model.source.localize tells a model dir from a hub id)."""
    if _is_url(value):
        return False
    if field == "model" and HUB_ID.match(value) and not value.startswith((".", "/", "~")):
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
    leaked = [k for k in (runtime_env.get("env_vars") or {}) if SECRET_NAME.search(str(k))]
    if leaked:
        raise SpecError(
            f"runtime_env.env_vars {leaked} look like credentials; they would be stored in Ray's job metadata. "
            "Give the cluster's nodes credentials through their environment or instance role instead."
        )
    pip = runtime_env.get("pip")
    entries = pip.get("packages", []) if isinstance(pip, dict) else pip if isinstance(pip, list) else []
    if any(redact_text(str(e)) != str(e) for e in entries):
        raise SpecError(
            "runtime_env.pip names an index URL with credentials; they would be stored in Ray's job metadata. "
            "Configure the index on the cluster's image (pip.conf) or its nodes' environment instead."
        )


def _check_urls(fields: dict) -> None:
    """URL fields of the spec with userinfo or query values (tokens, signatures) are refused: the entrypoint
    carries the spec into Ray's job metadata, readable by anyone with the Jobs API."""
    for key, value in fields.items():
        if isinstance(value, dict) and key != "runtime_env":  # storage.endpoint_url, ...
            _check_urls({f"{key}.{k}": v for k, v in value.items()})
        elif isinstance(value, str) and has_secret(value):
            raise SpecError(
                f"the spec's {key} ({redact_url(value)}) carries credentials in its URL; give the cluster "
                "credentials by reference (its nodes' environment, instance role or a Kubernetes Secret)"
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
        package_dir = str(Path(__file__).resolve().parents[1])  # fengshen_batch/, not this folder
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
    _check_urls(fields)
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
