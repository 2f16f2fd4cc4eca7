"""The output lease: one run at a time writes an output.

Two runs into one output would mix their results (each passes its checks, then both write shards, and one's
`_SUCCESS` ends up over the other's files). So a run holds `OUTPUT/_lease.json` from its checks to its
publish: created only if absent (a conditional create: S3's `If-None-Match: *`, `O_EXCL` on a local disk),
renewed every `RENEW_S` seconds by a thread of the driver, checked before every shard's commit and before
`_SUCCESS`, removed when the run ends, however it ends. A second run is refused, naming the holder. A lease
not renewed for `TTL_S` seconds, or one whose driver process on this host is gone (a killed driver), is
stale: the next run takes it over, conditionally on the very copy it found (S3's `If-Match` on its ETag; a
rename on a local disk), so of two runs taking over one wins. On stores without conditional writes (GCS, ...)
the run writes its lease, reads it back and checks it names its run id before every commit: two runs
started in the same instant may both begin, and the first commit of the loser stops it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from ..errors import JobError
from ..io.outputs import OutputStore
from ..io.redact import redact_url

log = logging.getLogger(__name__)

LEASE = "_lease.json"
TTL_S = 300.0
RENEW_S = 30.0


class LeaseLost(JobError):
    """Another run took this run's lease over: this run stops before committing anything more."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class OutputLease:
    """The lease of one run on `store` (an OutputStore); a context manager that acquires and releases it."""

    def __init__(self, store: OutputStore, job: str, ttl_s: float = TTL_S, renew_s: float = RENEW_S):
        self.store, self.fs = store, store.fs
        self.path = store.path_to(LEASE)
        self.ttl_s, self.renew_s = ttl_s, renew_s
        self.run_id = uuid.uuid4().hex
        self.body = {"run_id": self.run_id, "job": job, "host": socket.gethostname(), "pid": os.getpid(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "ttl_s": ttl_s}  # fmt: skip
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.s3 = "s3" in protocols
        self.local = type(self.fs).__name__ == "LocalFileSystem"
        self._etag: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the store's conditional writes -------------------------------------------------------------------
    def _bytes(self) -> bytes:
        return json.dumps({**self.body, "renewed": time.time()}).encode()

    def _create(self) -> bool:
        """Write the lease if no lease exists; whether this call wrote it."""
        if self.local:  # (object stores have no folders to make; s3fs's makedirs would create a bucket)
            os.makedirs(self.store.path, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._bytes())
            return True
        if self.s3:
            try:
                self.fs.pipe_file(self.path, self._bytes(), IfNoneMatch="*")
            except FileExistsError:
                return False
            self._etag = self.fs.info(self.path)["ETag"]
            return True
        if self.fs.exists(self.path):  # no conditional create: written, then read back (see the module doc)
            return False
        self.fs.pipe_file(self.path, self._bytes())
        return self._read() == self.run_id

    def _replace(self, expected_etag: str | None, stale_body: dict | None = None) -> bool:
        """Overwrite the lease only if it is still the copy seen (ours when renewing, a stale one when taking
        over); whether this call wrote it."""
        if self.s3:
            try:
                self.fs.pipe_file(self.path, self._bytes(), IfMatch=expected_etag)
            except (FileExistsError, OSError):  # 412 Precondition Failed: someone else's copy is there now
                return False
            self._etag = self.fs.info(self.path)["ETag"]
            return True
        if self.local and stale_body is not None:  # a rename succeeds for one taker only
            aside = f"{self.path}.stale-{self.run_id}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                return False
            os.remove(aside)
            return self._create()
        current = self._held()
        if current is None or current.get("run_id") != (stale_body or self.body)["run_id"]:
            return False
        self.fs.pipe_file(self.path, self._bytes())
        return True

    def _held(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:  # a torn or foreign file: treated as stale
            return {"run_id": None, "renewed": 0}

    def _read(self) -> str | None:
        held = self._held()
        return held and held.get("run_id")

    # --- the run's view ----------------------------------------------------------------------------------
    def _stale(self, held: dict) -> bool:
        if time.time() - float(held.get("renewed", 0)) > float(held.get("ttl_s", self.ttl_s)):
            return True
        return held.get("host") == socket.gethostname() and not _alive(int(held.get("pid", -1)))

    def acquire(self) -> OutputLease:
        """Hold the lease, taking over a stale one; JobError naming the holder if another run holds it."""
        for _ in range(3):  # the holder may release it between our create and our read
            if self._create():
                break
            held = self._held()
            if held is None:
                continue
            if self._stale(held):
                etag = self.fs.info(self.path).get("ETag") if self.s3 else None
                if self._replace(etag, held):
                    log.warning(
                        "took over the stale lease of run %s on %s", held.get("run_id"), self.store.url
                    )
                    break
            else:
                ago = time.time() - float(held.get("renewed", 0))
                raise JobError(
                    f"output {redact_url(self.store.url)} is being written by another run (run {held.get('run_id')}"
                    f", job {held.get('job')!r}, {held.get('host')} pid {held.get('pid')}, started {held.get('started')}"
                    f", renewed {ago:.0f}s ago): wait for it to finish; if it died on another machine its lease "
                    f"goes stale {max(0.0, float(held.get('ttl_s', self.ttl_s)) - ago):.0f}s from now"
                )  # fmt: skip
        else:
            raise JobError(f"could not take the lease of output {redact_url(self.store.url)}: retry")
        self._thread = threading.Thread(target=self._renew, name="fengshen-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                if not self._replace(self._etag):
                    held = self._held() or {}
                    self._lost = f"run {held.get('run_id')} on {held.get('host')} holds it now"
                    return
            except Exception as e:  # noqa: BLE001 - a storage hiccup: the next renewal tries again
                log.warning("could not renew the lease of %s: %s", self.store.url, e)

    def check(self) -> None:
        """Before a commit: LeaseLost if another run holds the lease now."""
        if self._lost is None and self._read() != self.run_id:
            held = self._held() or {}
            self._lost = f"run {held.get('run_id')} on {held.get('host')} holds it now"
        if self._lost:
            raise LeaseLost(
                f"this run lost the lease of output {redact_url(self.store.url)} ({self._lost}): it stopped "
                "without committing more; what it committed stays for a rerun to resume"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self._read() == self.run_id:
                self.fs.rm_file(self.path)
        except Exception as e:  # noqa: BLE001 - it goes stale by itself
            log.warning("could not remove the lease of %s: %s", self.store.url, e)

    def __enter__(self) -> OutputLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
