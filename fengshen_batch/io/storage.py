"""Object storage through fsspec: local paths, s3:// (s3fs), gs:// (gcsfs where installed), any fsspec URL.

Credentials are never taken from the spec: s3fs reads them from the standard AWS environment and config
(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, instance roles), and AWS_ENDPOINT_URL is honoured by
botocore. The spec's `storage:` block only sets the endpoint, region, anonymous access and profile.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import BinaryIO

import fsspec
from pydantic import BaseModel, ConfigDict


class StorageSpec(BaseModel):
    """Object-storage settings; anything left out comes from the AWS environment/config as usual."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = None  # S3-compatible endpoint (MinIO, Ceph, a moto server in tests)
    region: str | None = None
    anonymous: bool = False  # public buckets: unsigned requests
    profile: str | None = None  # a named profile of ~/.aws/config


def protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def storage_options(url: str, storage: StorageSpec) -> dict:
    """fsspec keyword arguments for `url` from the spec's storage block."""
    proto = protocol(url)
    opts: dict = {}
    if proto in ("s3", "s3a"):
        if storage.endpoint_url:
            opts["endpoint_url"] = storage.endpoint_url
        if storage.region:
            opts["client_kwargs"] = {"region_name": storage.region}
        if storage.anonymous:
            opts["anon"] = True
        if storage.profile:
            opts["profile"] = storage.profile
    elif proto in ("gs", "gcs") and storage.anonymous:
        opts["token"] = "anon"
    return opts


def filesystem(url: str, storage: StorageSpec) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URL or local path."""
    return fsspec.core.url_to_fs(url, **storage_options(url, storage))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def write_whole(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[BinaryIO], None]) -> None:
    """Create `path` by `write(file)` so that no reader ever sees part of it: shard files, markers, manifests.

    On object stores the object exists once its upload completes, and a failed write must not complete it:
    closing the file (as `with` would, or garbage collection) uploads what is buffered, so it is aborted and
    marked closed. On a local disk the bytes go to a hidden temporary file in the same folder, renamed into
    place (not fsspec's autocommit=False: its temporary file is in /tmp, and a move across file systems
    copies).
    """
    if not _is_local(fs):
        f = fs.open(path, "wb")
        try:
            write(f)
        except BaseException:
            f.discard()  # aborts a multipart upload already under way
            f.closed = True
            raise
        f.close()
        return
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols
