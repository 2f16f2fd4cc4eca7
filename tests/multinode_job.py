"""A job on a multi-node Ray (`ray.cluster_utils.Cluster`: a head and 2 worker nodes declaring 1 GPU each, so
the GPU scheduling path runs on CPU), optionally losing a worker node mid-job.

Run as a subprocess by the tests (the suite's own Ray occupies their process):
    python tests/multinode_job.py SPEC_JSON [--lose-node] [--replace-node]
It prints one line `REPORT {json}`: the manifest counts, the nodes the model actors ran on, what was killed and when.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only

import contextlib

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from fengshen_batch.job.run import run_job  # noqa: E402
from fengshen_batch.spec import build_spec  # noqa: E402


def actor_nodes() -> set[str]:
    from ray.util.state import list_actors

    return {a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")]) if "ModelActor" in a.class_name}


def main() -> None:
    spec = build_spec(json.loads(sys.argv[1]))
    lose, replace = "--lose-node" in sys.argv, "--replace-node" in sys.argv
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    report: dict = {"nodes_seen": []}
    markers = Path(spec.output) / "_markers"

    def watch():
        seen = set()
        while not (Path(spec.output) / "_SUCCESS").exists():
            with contextlib.suppress(Exception):
                seen |= actor_nodes()
            done = len(list(markers.glob("*.json"))) if markers.exists() else 0
            # lose a node once both actors run (or, failing that, well into the job: the test then says so)
            if lose and "lost_at_markers" not in report and (done >= 2 and len(seen) == 2 or done >= 8):
                report["lost_at_markers"] = done
                cluster.remove_node(workers[0], allow_graceful=False)
                if replace:  # what an autoscaler does for a lost spot node
                    cluster.add_node(num_cpus=2, num_gpus=1)
            report["nodes_seen"] = sorted(seen)
            threading.Event().wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    manifest = run_job(spec, progress=lambda line: print(line, file=sys.stderr))
    watcher.join(timeout=5)
    report.update(
        counts=manifest["counts"], shards=manifest["shards"], gpus_per_actor=manifest["gpus_per_actor"]
    )
    print("REPORT " + json.dumps(report), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
