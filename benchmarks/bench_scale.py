"""The score job at scale against a bare Ray Data pipeline running the same scoring call (issue 14).

Workload: N rows in 400 Parquet files, each row 1-2 KB: a short `text` that the tiny GPT2 scores (2-12
words, about 30 tokens) and a `body` passthrough column of 1-2 KB that rides along to the output. (With
1-2 KB of *scored* text the tiny model scores about 150 rows/s per core here, so 2M rows would take
hours per system on 2 cores; what the job adds - reading shards, writing files, markers, summaries - grows
with rows and bytes, which this keeps, while a cheaper model call makes that overhead a larger share.)

Systems, each in a fresh process on an embedded local Ray started the same way (`workers.cluster.init_ray`),
2 actors of 1 CPU each:
    job   `fengshen-batch run` of a score spec (shards of one input file each, report, optional quantile
          buckets): actors read and write their shards, the driver commits markers;
    bare  `ray.data.read_parquet -> map_batches(scorer actor pool: scoring.score_texts on 256 rows a call,
          appending nll_sum, token_count, ppl) -> write_parquet`: the same engine, none of the bookkeeping.

Recorded per run: wall time from process start to exit, the driver's peak RSS (VmHWM), and for the job
the manifest's start-up phases, its time to the last committed shard and each step after it.

    python benchmarks/bench_scale.py --rows 2000000 200000 --buckets
writes benchmarks/results/scale-cpu-<cores>c-<yyyymmdd>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fengshen_batch.tiny_model import build_tiny_gpt2  # noqa: E402

FILES = 400
ACTORS = 2
BATCH = 256  # rows per scoring call: the job's default batch_size

# The job's driver, with its peak RSS printed at exit. VmHWM, not getrusage's ru_maxrss: Linux carries
# ru_maxrss across exec, so a child would report at least its parent's peak (this script holds the input).
JOB = (
    "import sys; from fengshen_batch.cli import main\n"
    "try:\n    main(['run', sys.argv[1]], standalone_mode=False)\n"
    "finally:\n    print('PEAK_RSS_MB', [int(x.split()[1]) / 1024 for x in open('/proc/self/status') "
    "if x.startswith('VmHWM')][0], flush=True)\n"
)

# The bare pipeline: what a user would write with Ray Data and our scoring call, nothing else.
BARE = """
import sys, time
import pyarrow as pa
import ray
from fengshen_batch.workers import cluster
from fengshen_batch.job.display import quiet_ray

model, src, dst, actors, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])


class Scorer:
    def __init__(self):
        import torch

        from fengshen_batch.model.load import load_replica

        torch.set_num_threads(1)
        self.replica = load_replica(model, device="cpu", dtype="auto")
        self.budget = 2048

    def __call__(self, table: pa.Table) -> pa.Table:
        from fengshen_batch.kinds.scoring import score_texts

        results, self.budget = score_texts(self.replica, table.column("text").to_pylist(), None, self.budget)
        ok = [getattr(r, "nll_sum", None) is not None for r in results]
        table = table.append_column("nll_sum", pa.array([r.nll_sum if o else None for r, o in zip(results, ok)]))
        table = table.append_column("token_count", pa.array([r.token_count if o else None for r, o in zip(results, ok)]))
        return table.append_column("ppl", pa.array([r.ppl if o else None for r, o in zip(results, ok)]))


try:
    quiet_ray(None, False)
    cluster.init_ray(None, min_cpus=actors)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.read_parquet(src)
    ds = ds.map_batches(Scorer, batch_size=batch, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1)
    ds.write_parquet(dst)
    ray.shutdown()
finally:
    print("PEAK_RSS_MB", [int(x.split()[1]) / 1024 for x in open("/proc/self/status") if x.startswith("VmHWM")][0],
          flush=True)
"""

WORDS = [
    *[
        "the",
        "patient",
        "was",
        "given",
        "aspirin",
        "for",
        "fever",
        "and",
        "the",
        "doctor",
        "checked",
        "blood",
        "pressure",
        "heart",
        "rate",
    ],
    *[
        "北京",
        "今天",
        "天气",
        "很好",
        "我们",
        "去",
        "医院",
        "看",
        "医生",
        "病人",
        "发烧",
        "了",
        "需要",
        "休息",
    ],
]


def make_input(folder: Path, rows: int, files: int = FILES, seed: int = 0) -> dict:
    """`rows` rows in `files` files: text of 2-12 words, body of 1,000-2,000 bytes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    per, extra = divmod(rows, files)
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", dtype=np.uint8)
    total_bytes = 0
    row = 0
    for f in range(files):
        n = per + (f < extra)
        lengths = rng.integers(2, 13, size=n)
        words = rng.integers(0, len(WORDS), size=int(lengths.sum()))
        texts, at = [], 0
        for length in lengths:
            texts.append(" ".join(WORDS[w] for w in words[at : at + length]))
            at += length
        blen = rng.integers(1000, 2001, size=n)
        chars = alphabet[rng.integers(0, len(alphabet), size=int(blen.sum()))].tobytes().decode()
        bodies, at = [], 0
        for b in blen:
            bodies.append(chars[at : at + b])
            at += b
        ids = [f"doc-{row + i}" for i in range(n)]
        row += n
        table = pa.table({"id": ids, "text": texts, "body": bodies})
        total_bytes += table.nbytes
        pq.write_table(table, folder / f"part-{f:04d}.parquet")
    return {"rows": rows, "files": files, "bytes_in_memory": total_bytes}


def _run(code: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds from process start to exit, the driver's peak RSS in MB)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, *code], capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.monotonic() - start
    if proc.returncode:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-4000:])
    peak = float(next(x for x in proc.stdout.splitlines() if x.startswith("PEAK_RSS_MB")).split()[1])
    return wall, peak


def run_job(work: Path, model: Path, src: Path, rows: int, buckets: bool) -> dict:
    out = work / f"out-job-{rows}{'-buckets' if buckets else ''}"
    spec = {"kind": "score", "model": str(model), "input": str(src), "output": str(out), "actors": ACTORS,
            "shard_rows": -(-rows // FILES), "batch_size": BATCH}  # fmt: skip
    if buckets:
        spec["bucket_quantiles"] = [0.5, 0.9]
    path = work / f"job-{rows}.yaml"
    path.write_text(yaml.safe_dump(spec))
    wall, peak = _run(["-c", JOB, str(path)], work)
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["input_rows"] == rows, m["counts"]
    res = {"system": "job", "rows": rows, "buckets": buckets, "wall_s": round(wall, 1),
           "driver_peak_rss_mb": round(peak, 1), "shards": m["shards"], "to_last_shard_s": m["wall_seconds"],
           "finish_seconds": m.get("finish_seconds", {}), "startup": m["startup"], "counts": m["counts"]}  # fmt: skip
    # after the last shard: the manifest's steps, then writing it, _SUCCESS, Ray's shutdown and exit
    res["after_last_shard_s"] = round(wall - m["wall_seconds"], 1)
    shutil.rmtree(out)
    return res


def run_bare(work: Path, model: Path, src: Path, rows: int) -> dict:
    out = work / f"out-bare-{rows}"
    wall, peak = _run(["-c", BARE, str(model), str(src), str(out), str(ACTORS), str(BATCH)], work)
    written = pq.ParquetDataset(out).read(columns=["ppl"])
    assert len(written) == rows, len(written)
    shutil.rmtree(out)
    return {"system": "bare", "rows": rows, "wall_s": round(wall, 1), "driver_peak_rss_mb": round(peak, 1)}


def _steps_after_last_shard(run: dict) -> dict[str, float]:
    """Each step between a job's last committed shard and its exit: the manifest's `finish_seconds`, and
    the rest (writing the manifest and _SUCCESS, Ray's shutdown, process exit) as `exit`."""
    steps = dict(run["finish_seconds"])
    steps["exit"] = round(run["after_last_shard_s"] - sum(steps.values()), 1)
    return steps


def score(runs: list[dict], largest: int, smallest: int) -> dict:
    """The issue's targets, at the largest size (the scale this benchmark is for)."""
    job = next(r for r in runs if r["system"] == "job" and r["rows"] == largest and not r["buckets"])
    bare = next(r for r in runs if r["system"] == "bare")
    small = [r for r in runs if r["system"] == "job" and r["rows"] == smallest and not r["buckets"]]
    shares = {
        f"{step}{' (buckets run)' if r['buckets'] else ''}": round(seconds / r["wall_s"], 3)
        for r in runs if r["system"] == "job" and r["rows"] == largest
        for step, seconds in _steps_after_last_shard(r).items()
    }  # fmt: skip
    longest = max(shares, key=shares.get)
    targets = {
        "job_vs_bare_wall": {"target": "<= 1.1", "value": round(job["wall_s"] / bare["wall_s"], 3)},
        "driver_rss_largest_vs_smallest": {
            "target": "<= 1.2",
            "value": round(job["driver_peak_rss_mb"] / small[0]["driver_peak_rss_mb"], 3) if small else None,
        },
        "longest_step_after_last_shard": {
            "target": "<= 0.05",
            "value": shares[longest],
            "step": longest,
            "shares_of_job_wall": shares,
        },  # fmt: skip
    }
    for t in targets.values():
        t["met"] = t["value"] is not None and t["value"] <= float(t["target"].split()[-1])
    return targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[2_000_000, 200_000],
                    help="the first size also runs the bare pipeline")  # fmt: skip
    ap.add_argument(
        "--buckets", action="store_true", help="also run the job at the first size with quantile buckets"
    )
    ap.add_argument("--work", type=Path, help="scratch folder (default: a new temp dir, removed at the end)")
    ap.add_argument(
        "--rescore", type=Path, help="recompute the targets of an existing results file, run nothing"
    )
    args = ap.parse_args()
    if args.rescore:
        result = json.loads(args.rescore.read_text())
        sizes = sorted({r["rows"] for r in result["runs"]})
        result["targets"] = score(result["runs"], sizes[-1], sizes[0])
        args.rescore.write_text(json.dumps(result, indent=2) + "\n")
        return print(json.dumps(result["targets"], indent=1))
    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.work))
    runs, inputs = [], {}
    try:
        model = build_tiny_gpt2(work / "model", n_positions=64)
        for i, rows in enumerate(args.rows):
            src = work / f"in-{rows}"
            t = time.monotonic()
            inputs[rows] = {**make_input(src, rows), "make_s": round(time.monotonic() - t, 1)}
            print(f"input {rows}: {inputs[rows]}", flush=True)
            # at the first size: the bare pipeline beside the job on the same rows, then the job with buckets
            todo = ["bare", "job"] if i == 0 else ["job"]
            todo += ["job+buckets"] if i == 0 and args.buckets else []
            for system in todo:
                if system == "bare":
                    runs.append(run_bare(work, model, src, rows))
                else:
                    runs.append(run_job(work, model, src, rows, buckets=system == "job+buckets"))
                print(runs[-1], flush=True)
            shutil.rmtree(src)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    targets = score(runs, args.rows[0], min(args.rows))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    result = {"benchmark": "scale", "date": dt.date.today().isoformat(), "commit": commit,
              "cores": os.cpu_count(), "actors": ACTORS, "inputs": inputs, "runs": runs, "targets": targets}  # fmt: skip
    out = ROOT / "benchmarks" / "results" / f"scale-cpu-{os.cpu_count()}c-{dt.date.today():%Y%m%d}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(targets, indent=1), f"\nwrote {out}")


if __name__ == "__main__":
    main()
