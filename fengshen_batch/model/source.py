"""Where a model comes from, without torch: a local Hugging Face directory, an fsspec URL prefix (`s3://bucket/models/wenzhong/`,
`gs://...`, `file://...`: downloaded once per node into a local cache, atomically, under a file lock), or a hub id
(`IDEA-CCNL/Wenzhong-GPT2-3.5B`, where the hub is reachable). Also the cheap checks a job makes before Ray starts
(config.json says GPT2) and the fingerprint a later job's baseline check compares."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import ModelLoadError
from ..io.redact import redact_text, redact_url

log = logging.getLogger(__name__)

# Files a replica needs besides its weights; anything else under a model prefix is not downloaded.
METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


_COMPLETE = ".complete"


def default_cache_dir() -> Path:
    return Path(os.environ.get("FENGSHEN_CACHE", Path.home() / ".cache" / "fengshen_batch")) / "models"


def is_url(source: str) -> bool:
    return "://" in source


def pick_weight_files(names: list[str], source: str) -> list[str]:
    """safetensors (with its shard index) if there are any, else the pickled shards; never both."""
    safetensors = [n for n in names if n.endswith(".safetensors") or n == "model.safetensors.index.json"]
    if any(n.endswith(".safetensors") for n in safetensors):
        return safetensors
    pickled = [n for n in names if re.fullmatch(r"pytorch_model.*\.bin(\.index\.json)?", n)]
    if any(n.endswith(".bin") for n in pickled):
        return pickled
    raise ModelLoadError(f"no weights (*.safetensors or pytorch_model*.bin) under model prefix {source}")


_VERSION_KEYS = ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "last_modified", "updated")


def _list_prefix(url: str, storage_options: dict | None):
    """(filesystem, root, the files a replica needs, their version): one listing of the prefix. The version
    is a digest of those files' names, sizes and ETags (or generations, modification times): it changes when
    the model under the prefix changes."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        entries = {Path(e["name"]).name: e for e in fs.ls(root, detail=True)}
    except FileNotFoundError as e:
        raise ModelLoadError(f"model prefix not found: {redact_url(url)}") from e
    except Exception as e:  # auth, endpoint, network: name the source, not the credentials
        raise ModelLoadError(redact_text(f"cannot list model prefix {url}: {type(e).__name__}: {e}")) from e
    names = sorted(entries)
    if "config.json" not in names:
        raise ModelLoadError(
            f"no config.json under model prefix {redact_url(url)}: not a Hugging Face model directory"
        )
    wanted = [n for n in names if n in METADATA_FILES] + pick_weight_files(names, url)
    digest = hashlib.sha256()
    for name in sorted(wanted):
        e = entries[name]
        tag = next((str(e[k]) for k in _VERSION_KEYS if e.get(k) is not None), "")
        digest.update(f"{name}\0{e.get('size')}\0{tag}\n".encode())
    return fs, root, wanted, digest.hexdigest()[:12]


def model_version(source: str, storage_options: dict | None = None) -> str | None:
    """The version of a URL-prefix model as `fetch_to_cache` computes it (None for a local dir or hub id):
    the driver records it, and every replica of the job loads exactly that version."""
    if is_url(source) and not source.startswith("file://"):
        return _list_prefix(source.rstrip("/"), storage_options)[3]
    return None


def fetch_to_cache(
    url: str,
    cache_dir: str | Path | None = None,
    storage_options: dict | None = None,
    expected_version: str | None = None,
) -> tuple[Path, bool]:
    """Download a model prefix into the node-local cache once per version; return (local dir, whether this
    call downloaded).

    Every call lists the prefix (one request) and keys the copy by the files' version, so a model changed
    under the same prefix is fetched anew, never served from the old copy. `expected_version`: the version
    the job's driver saw; a prefix that no longer has it is refused, so one job never mixes two models.
    Concurrent callers on one node (actors, processes) serialise on a file lock; the loser finds the finished
    copy. A copy is visible only once complete: it is assembled in a temp dir and renamed into place.
    """
    from filelock import FileLock

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    url = url.rstrip("/")
    fs, root, wanted, version = _list_prefix(url, storage_options)
    if expected_version is not None and version != expected_version:
        raise ModelLoadError(
            f"the model under {redact_url(url)} changed since the job started (version {expected_version}, now "
            f"{version}): one job runs one model; rerun it to use the new one"
        )
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    dest = cache / f"{url.rsplit('/', 1)[-1]}-{key}-{version}"
    if (dest / _COMPLETE).exists():
        return dest, False

    with FileLock(str(dest) + ".lock"):
        if (dest / _COMPLETE).exists():
            return dest, False
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{dest.name}.tmp-"))
        try:
            log.info("downloading %d files of %s to %s", len(wanted), redact_url(url), dest)
            for name in wanted:
                fs.get(f"{root}/{name}", str(tmp / name))
            (tmp / _COMPLETE).write_text(f"{redact_url(url)}\n{version}\n")
            if dest.exists():  # an incomplete copy left by a killed process
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest, True


def _hub_unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """Why the hub cannot be reached, or None. One TCP connect: the hub client itself retries for long."""
    url = urlsplit(endpoint)
    try:
        socket.create_connection(
            (url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout
        ).close()
    except OSError as e:
        return f"{url.hostname}: {e}"
    return None


def _fetch_from_hub(repo_id: str, cache_dir: Path | None) -> Path:
    from huggingface_hub import constants, list_repo_files, snapshot_download

    hint = (
        "Where the hub is unreachable, copy the model to a local directory or a bucket prefix and pass that."
    )
    if not constants.HF_HUB_OFFLINE and (why := _hub_unreachable(constants.ENDPOINT)):
        raise ModelLoadError(f"cannot reach the Hugging Face hub to fetch {repo_id!r} ({why}). {hint}")
    try:
        names = [n for n in list_repo_files(repo_id) if "/" not in n]
        wanted = [n for n in names if n in METADATA_FILES] + pick_weight_files(names, repo_id)
        return Path(snapshot_download(repo_id, allow_patterns=wanted, cache_dir=cache_dir))
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0]}). {hint}"
        ) from e


def localize(
    source: str,
    cache_dir: str | Path | None = None,
    storage_options: dict | None = None,
    expected_version: str | None = None,
) -> Path:
    """The local directory holding `source`, downloading it first if it is a URL prefix (of
    `expected_version`, when given: see `fetch_to_cache`) or hub id."""
    if is_url(source) and not source.startswith("file://"):
        return fetch_to_cache(source, cache_dir, storage_options, expected_version)[0]
    path = Path(source.removeprefix("file://")).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"model path is a file, not a model directory: {source}")
    if HUB_ID.match(source) and not source.startswith((".", "/")):
        return _fetch_from_hub(source, Path(cache_dir) if cache_dir else None)
    raise _not_found(source)


def fetch_metadata(source: str, storage_options: dict | None = None) -> Path:
    """A local directory with `source`'s config and tokenizer files but none of its weights (`plan`
    tokenizes a sample without loading a model): the directory itself, a temp copy of a URL prefix's small
    files, or the hub's (from its cache when offline)."""
    if is_url(source) and not source.startswith("file://"):
        fs, root, wanted, _ = _list_prefix(source.rstrip("/"), storage_options)
        dest = Path(tempfile.mkdtemp(prefix="fengshen-plan-"))
        for name in (n for n in wanted if n in METADATA_FILES):
            fs.get(f"{root}/{name}", str(dest / name))
        return dest
    path = Path(source.removeprefix("file://")).expanduser()
    if path.is_dir():
        return path
    if HUB_ID.match(source):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(source, allow_patterns=list(METADATA_FILES)))
        except Exception as e:
            raise ModelLoadError(f"cannot fetch the tokenizer of {source!r}: {type(e).__name__}") from e
    raise _not_found(source)


def _not_found(source: str) -> ModelLoadError:
    return ModelLoadError(f"model not found: {source} is neither a directory, a URL prefix nor a hub id")


def _require_gpt2(model_type: str | None, source: str, trust_remote_code: bool) -> None:
    if model_type != "gpt2" and not trust_remote_code:
        raise ModelLoadError(
            f"{source} is a {model_type!r} model; fengshen-batch runs GPT2-family models "
            "(GPT2LMHeadModel, as Wenzhong/Yuyuan-GPT2-3.5B)"
        )


def check_model_dir(path: Path, source: str, trust_remote_code: bool = False) -> dict:
    """Read config.json as JSON and refuse what is not a GPT2 causal LM: cheap (no torch, no transformers),
    so jobs call it before Ray starts. Returns the config."""
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"no config.json in {source}: not a Hugging Face model directory") from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {source}/config.json: {type(e).__name__}: {e}") from None
    _require_gpt2(config.get("model_type"), source, trust_remote_code)
    return config


def check_model_source(
    source: str, storage_options: dict | None = None, trust_remote_code: bool = False
) -> dict | None:
    """Fail early, before any replica loads, on a model that is missing or not GPT2 (reads config.json only).
    Returns the config, or None for a hub id not in this machine's hub cache (read only when it loads); a
    hub id is refused here when the hub cannot be reached and the model is not cached."""
    if is_url(source) and not source.startswith("file://"):
        import fsspec

        url = source.rstrip("/") + "/config.json"
        try:
            with fsspec.open(url, "rb", **(storage_options or {})) as f:
                config = json.load(f)
        except FileNotFoundError:
            raise ModelLoadError(f"model not found: no config.json under {redact_url(source)}") from None
        except Exception as e:
            raise ModelLoadError(redact_text(f"cannot read {url}: {type(e).__name__}: {e}")) from None
        _require_gpt2(config.get("model_type"), redact_url(source), trust_remote_code)
        return config
    path = Path(source.removeprefix("file://")).expanduser()
    if path.is_dir():
        return check_model_dir(path, source, trust_remote_code)
    if not HUB_ID.match(source) or path.exists():
        raise _not_found(source)
    return _check_hub_model(source, trust_remote_code)


def _check_hub_model(repo_id: str, trust_remote_code: bool) -> dict | None:
    """The config of a cached hub model; else None once the hub is known reachable (the replicas fetch it),
    or one line naming why it is not (before, an unreachable hub surfaced as actors dying, each repeating it)."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return check_model_dir(Path(cached).parent, repo_id, trust_remote_code)
    if not constants.HF_HUB_OFFLINE and (why := _hub_unreachable(constants.ENDPOINT)):
        raise ModelLoadError(
            f"cannot reach the Hugging Face hub to fetch {repo_id!r} ({why}), and it is not in this machine's "
            "hub cache: copy the model to a local directory or a bucket prefix and pass that"
        )
    return None


# The files that make a model's numbers what they are, besides its weights: what a baseline check compares.
FINGERPRINT_FILES = {"config": ("config.json",), "tokenizer": ("tokenizer.json", "vocab.json", "merges.txt")}


def model_fingerprint(source: str, storage_options: dict | None = None) -> dict[str, str]:
    """{"config": sha256, "tokenizer": sha256} of a local or bucket model's config.json and tokenizer files
    (each the first 16 hex digits over the files present, in order): a few small reads, no weights. A hub id
    gives {} (the driver may have no copy; its name is what identifies it)."""
    if is_url(source) and not source.startswith("file://"):
        import fsspec

        fs, root = fsspec.core.url_to_fs(source.rstrip("/"), **(storage_options or {}))

        def read(name: str) -> bytes | None:
            try:
                return fs.cat_file(f"{root}/{name}")
            except FileNotFoundError:
                return None
    else:
        path = Path(source.removeprefix("file://")).expanduser()
        if not path.is_dir():
            return {}

        def read(name: str) -> bytes | None:
            return (path / name).read_bytes() if (path / name).is_file() else None

    out = {}
    for part, names in FINGERPRINT_FILES.items():
        digest = hashlib.sha256()
        for name in names:
            if (data := read(name)) is not None:
                digest.update(name.encode() + b"\0" + data)
        out[part] = digest.hexdigest()[:16]
    return out
