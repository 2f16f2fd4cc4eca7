"""Start-up of a demo-size job: seconds from `fengshen-batch run` to its first committed shard, this tree
against an earlier commit, in the same run.

A demo-size job is the demo's score job: the built-in tiny GPT2 and its 12 sample texts in 2 files, one
shard per file, on an embedded local Ray. Each run is a fresh process (a new Ray each time, as for a user);
the time to the first shard is read from outside (the first marker file to appear under OUTPUT/_markers/),
so both versions are measured the same way. Runs alternate between the versions (A B A B ...) so that any
drift of the machine falls on both. This tree's manifest also splits the start-up into its phases.

    python benchmarks/bench_startup.py --baseline 3154773 --runs 5
writes benchmarks/results/startup-cpu-<cores>c-<yyyymmdd>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fengshen_batch.tiny_model import SAMPLE_LINES, build_tiny_gpt2  # noqa: E402


def _job(work: Path) -> Path:
    model = build_tiny_gpt2(work / "model", n_positions=128)
    half = len(SAMPLE_LINES) // 2
    (work / "texts").mkdir()
    for i, lines in enumerate((SAMPLE_LINES[:half], SAMPLE_LINES[half:])):
        pq.write_table(pa.table({"text": lines}), work / "texts" / f"part-{i}.parquet")
    spec = {"kind": "score", "model": str(model), "input": str(work / "texts"),
            "output": str(work / "out"), "actors": 1}  # fmt: skip
    (work / "job.yaml").write_text(yaml.safe_dump(spec))
    return work / "job.yaml"


def _run_once(tree: Path, spec: Path, out: Path) -> dict:
    """One job in a fresh process with `tree` first on the path; seconds to the first marker and to exit."""
    shutil.rmtree(out, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = str(tree)  # the driver and the Ray workers it starts import this tree's package
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fengshen_batch", "run", str(spec)],
        env=env, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first = None
    while proc.poll() is None:
        if first is None and (out / "_markers").exists() and any((out / "_markers").iterdir()):
            first = time.monotonic() - start
        time.sleep(0.02)
    total = time.monotonic() - start
    if proc.returncode:
        raise RuntimeError(f"job failed in {tree}: {proc.stderr.read()[-2000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    return {"first_shard_s": round(first, 3), "exit_s": round(total, 3), "startup": manifest.get("startup")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--baseline", required=True, help="git commit to compare with (checked out to a temp dir)"
    )
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, help="result file (default benchmarks/results/startup-...)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    base = work / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.baseline],
                   check=True, capture_output=True)  # fmt: skip
    try:
        spec = _job(work)
        trees = {"baseline": base, "this_tree": ROOT}
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for i in range(args.runs):
            for name, tree in trees.items():
                r = _run_once(tree, spec, work / "out")
                runs[name].append(r)
                print(f"run {i} {name:9s} first shard {r['first_shard_s']:6.2f}s  exit {r['exit_s']:6.2f}s")
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
        shutil.rmtree(work, ignore_errors=True)

    def median(name: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs[name]), 3)

    phases = [r["startup"] for r in runs["this_tree"] if r["startup"]]
    result = {
        "benchmark": "startup",
        "date": dt.date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPU cores, no GPU",
        "workload": "the demo's score job: tiny GPT2, 12 texts in 2 files (2 shards), 1 CPU replica, "
        "embedded local Ray; each run a fresh process",
        "baseline_commit": args.baseline,
        "this_tree_commit": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),  # fmt: skip
        "runs": args.runs,
        "median_first_shard_s": {name: median(name, "first_shard_s") for name in runs},
        "median_exit_s": {name: median(name, "exit_s") for name in runs},
        "ratio_first_shard": round(
            median("this_tree", "first_shard_s") / median("baseline", "first_shard_s"), 3
        ),
        "this_tree_median_phases_s": {
            k: round(statistics.median(p[k] for p in phases if k in p), 3)
            for k in (phases[0] if phases else {})
        },
        "all_runs": runs,
    }
    out = (
        args.out
        or ROOT / "benchmarks" / "results" / f"startup-cpu-{os.cpu_count()}c-{dt.date.today():%Y%m%d}.json"
    )
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "all_runs"}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
