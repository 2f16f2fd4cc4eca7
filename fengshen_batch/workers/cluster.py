"""Start or join Ray, and the cluster-wide tasks the driver hands out besides the model actors (rewriting data
files, e.g. with their quantile buckets)."""

from __future__ import annotations

import logging
import os

import ray

LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def init_ray(address: str | None, min_cpus: float = 1) -> bool:
    """Join `address` (or RAY_ADDRESS), else start an embedded Ray on 127.0.0.1; True if started here."""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    host = address.rsplit(":", 1)[0].split("://")[-1] if address else None
    if not address or host in ("127.0.0.1", "localhost"):
        # A Ray that talks over loopback only (ours, or a head on this machine at 127.0.0.1). Ray maps
        # 127.0.0.1 to the machine's interface address unless its local-only mode is on (its own switch,
        # the default on macOS/Windows); the constant is read at call time, the variable covers the
        # processes Ray starts.
        os.environ[LOCAL_ONLY_ENV] = "0"
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # Logical CPUs: enough for the actors plus the read tasks, whatever this machine's core count.
        cpus = max(os.cpu_count() or 1, int(min_cpus) + 1)
        # Only what a job needs: no dashboard, and no metrics pipeline (nothing would read it; the raylet
        # otherwise waits for the metrics agent at start). address="local": a new Ray of our own even where
        # a `ray start --head` runs on this machine (plain ray.init() would join it, and refuse num_cpus).
        ray.init(
            address="local",
            include_dashboard=False,
            num_cpus=cpus,
            logging_level=logging.WARNING,
            _system_config={"enable_metrics_collection": False},
        )
    return True


def cluster_gpus() -> float:
    return ray.cluster_resources().get("GPU", 0.0)


def map_files(fn, paths: list[str], **kwargs) -> list:
    """`fn(paths=part, **kwargs)` over slices of `paths` in parallel Ray tasks; the results in slice order.

    Two tasks per cluster CPU, each taking a slice of the files (a few threads each, for object-store
    latency): a task per file would start a worker process per concurrent task, which costs more than
    rewriting a shard's file (25 ms for 7 MB here)."""
    tasks = max(1, min(len(paths), 2 * int(ray.cluster_resources().get("CPU", 1))))
    task = ray.remote(num_cpus=1)(fn)
    return ray.get([task.remote(paths=paths[i::tasks], **kwargs) for i in range(tasks)])
