"""Driver peak memory against input size: a score job whose rows carry a 2 KB passthrough column.

Before workers wrote their shards, every result row travelled to the driver, whose peak RSS grew with the
data (issue 14: 783 MB at 40k rows, 2,093 MB at 320k). Now only per-shard commit records and summaries do.
Each size runs in a fresh driver process (`fengshen-batch run`, embedded local Ray, the tiny GPT2, 1 CPU
actor); its peak RSS is read from the process itself (VmHWM of the driver, not of Ray's processes).

    python benchmarks/bench_driver_memory.py --rows 40000 320000
writes benchmarks/results/driver-memory-cpu-<cores>c-<yyyymmdd>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
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
from fengshen_batch.tiny_model import build_tiny_gpt2  # noqa: E402

# The driver, with its peak RSS printed at exit. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss
# across exec, so a child would report at least its parent's (this script's) peak.
DRIVER = (
    "import sys; from fengshen_batch.cli import main\n"
    "try:\n    main(['run', sys.argv[1]], standalone_mode=False)\n"
    "finally:\n    print('PEAK_RSS_MB', [int(x.split()[1]) / 1024 for x in open('/proc/self/status') "
    "if x.startswith('VmHWM')][0], flush=True)\n"
)


def _input(folder: Path, rows: int, files: int) -> None:
    folder.mkdir(parents=True)
    pad = "x" * 2048  # the passthrough column: 2 KB per row, never needed by the model
    per = rows // files
    for f in range(files):
        texts = [f"row {f}-{i} 北京 aspirin" for i in range(per)]
        pq.write_table(pa.table({"text": texts, "blob": [pad] * per}), folder / f"part-{f:04d}.parquet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[40_000, 320_000])
    ap.add_argument("--shard-rows", type=int, default=4096)
    ap.add_argument(
        "--tree", type=Path, help="run this checkout's fengshen_batch instead (e.g. an old commit)"
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-driver-mem-"))
    model = build_tiny_gpt2(work / "model", n_positions=64)
    results = []
    for rows in args.rows:
        _input(work / f"in-{rows}", rows, files=max(1, rows // 20_000))
        spec = {"kind": "score", "model": str(model), "input": str(work / f"in-{rows}"),
                "output": str(work / f"out-{rows}"), "actors": 1, "shard_rows": args.shard_rows}  # fmt: skip
        (work / f"job-{rows}.yaml").write_text(yaml.safe_dump(spec))
        start = time.monotonic()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        if args.tree:
            env["PYTHONPATH"] = str(args.tree)
        proc = subprocess.run([sys.executable, "-c", DRIVER, str(work / f"job-{rows}.yaml")],
                              capture_output=True, text=True, env=env, cwd=work)  # fmt: skip
        wall = time.monotonic() - start
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        peak = float(next(x for x in proc.stdout.splitlines() if x.startswith("PEAK_RSS_MB")).split()[1])
        manifest = json.loads((work / f"out-{rows}" / "manifest.json").read_text())
        results.append({"rows": rows, "shards": manifest["shards"], "driver_peak_rss_mb": round(peak, 1),
                        "wall_s": round(wall, 1)})  # fmt: skip
        print(results[-1], flush=True)
    commit = subprocess.run(["git", "-C", str(args.tree or ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    name = f"driver-memory-cpu-{os.cpu_count()}c-{dt.date.today():%Y%m%d}-{commit}.json"
    out = ROOT / "benchmarks" / "results" / name
    out.write_text(json.dumps({"benchmark": "driver_memory", "date": dt.date.today().isoformat(), "commit": commit,
                               "workload": "score job, rows with a 2 KB passthrough column, tiny GPT2, 1 CPU actor",
                               "runs": results}, indent=2) + "\n")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
