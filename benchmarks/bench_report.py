"""What the generation report costs a job (issue 23): a benchmark, never a test.

    python benchmarks/bench_report.py              # bench_job.py's mixed workload: 768 prompts, n=2
    python benchmarks/bench_report.py --rows 64    # a smoke test

Runs one `fengshen-batch generate` job on bench_job.py's mixed workload (prompts of 16..256 tokens, per-row limits
8..160, sampling with EOS on, the same 6-layer 256-wide GPT2, one actor with 2 CPUs) with 2 samples per prompt and
`--report-by source` (4 sources), then measures:
- `report_s`: the driver's report step (merge the shards' summaries, summary.json, two PNGs, report.html), the
  manifest's `finish_seconds.report`;
- `summarize_s`: the actors' share, the per-shard summaries (`sample_sketch.summarize`) re-timed here on the
  job's own data files, one after another in one process (the actor runs them inside the job's wall time);
- `rebuild_s`: `fengshen-batch report OUTPUT --by finish_reason` (from the data files, as a user rebuilds it);
and each against the job's wall time (`wall_seconds`); the target is report + summaries <= 5% of it.
Writes benchmarks/results/report-generate-cpu-2t-<yyyymmdd>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_job import (  # noqa: E402
    CLI,
    DATA_SEED,
    JOB_SEED,
    MAX_NEW_TOKENS,
    MODEL_CFG,
    TEMPERATURE,
    TOP_P,
    make_prompts,
)

SOURCES = ("web", "books", "forum", "news")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=768)
    ap.add_argument("--samples", type=int, default=2, help="num_return_sequences")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from fengshen_batch.reports.generate_sketch import summarize
    from fengshen_batch.tiny_model import build_tiny_gpt2

    work = Path(tempfile.mkdtemp(prefix="bench-report-"))
    build_tiny_gpt2(work / "model", **MODEL_CFG)
    tok = AutoTokenizer.from_pretrained(work / "model")
    prompts, limits, _, _ = make_prompts(tok, args.rows, DATA_SEED)
    (work / "in").mkdir()
    sources = [SOURCES[i % len(SOURCES)] for i in range(args.rows)]
    pq.write_table(
        pa.table({"prompt": prompts, "limit": limits, "source": sources}), work / "in" / "part-0.parquet"
    )
    out = work / "out"
    cmd = [CLI, "generate", "--model", str(work / "model"), "--input", str(work / "in"), "--output", str(out),
           "--max-new-tokens", str(MAX_NEW_TOKENS), "--max-new-tokens-column", "limit", "--temperature",
           str(TEMPERATURE), "--top-p", str(TOP_P), "--seed", str(JOB_SEED), "--num-return-sequences",
           str(args.samples), "--report-by", "source", "--actors", "1", "--cpus-per-actor", "2", "--dtype", "float32"]  # fmt: skip
    subprocess.run(cmd, check=True)
    manifest = json.loads((out / "manifest.json").read_text())
    wall = manifest["wall_seconds"]
    report_s = manifest["finish_seconds"]["report"]

    # the actors' share: each data file (one per shard) summarised again, as its actor did
    summarize_s = 0.0
    for path in sorted((out / "data").glob("*.parquet")):
        table = pq.read_table(path)
        t = time.perf_counter()
        summarize(table, "prompt", "source")
        summarize_s += time.perf_counter() - t
    t = time.perf_counter()
    subprocess.run([CLI, "report", str(out), "--by", "finish_reason"], check=True)
    rebuild_s = time.perf_counter() - t
    summary = json.loads((out / "report" / "summary.json").read_text())

    share = (report_s + summarize_s) / wall
    result = {
        "benchmark": "generate-report", "date": dt.date.today().isoformat(), "device": "cpu-2t",
        "git_sha": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                  cwd=ROOT).stdout.strip(),
        "workload": {"rows": args.rows, "num_return_sequences": args.samples, "report_by": "source",
                     "model": MODEL_CFG, "samples": summary["samples"],
                     "generated_tokens": summary["generated_tokens"]["sum"], "shards": manifest["shards"]},
        "job_wall_s": wall, "report_s": report_s, "summarize_s": round(summarize_s, 3),
        "rebuild_from_files_s": round(rebuild_s, 3),
        "report_plus_summaries_share_of_wall": round(share, 4),
        "target": {"share": "<= 0.05", "met": share <= 0.05},
        "figures": {k: summary[k] for k in ("limit_hit_fraction", "duplicate_samples", "distinct_1", "distinct_2",
                                            "repetition_loops", "exact")},
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    suffix = "" if args.rows == 768 else f"-rows{args.rows}"
    path = Path(args.out) / f"report-generate-cpu-2t-{dt.date.today():%Y%m%d}{suffix}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
