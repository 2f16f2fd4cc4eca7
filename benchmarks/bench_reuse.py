"""Nightly scoring that reuses earlier results (issue 37): does a night cost only what changed, and is it
the same night?

night    an earlier night of N documents (default 200k, mixed lengths, Chinese and English) scored in full;
         tonight built from it: 90% of its rows unchanged but in rewritten files (other names, rows
         reordered, new passthrough values), 5% edited, 5% new. Tonight scored twice in the same run, in
         full and with `reuse` of the earlier night (both against it as baseline): wall time, the reused
         rows against the earlier output (bit for bit), every row against the full rescoring, and the
         report's and drift comparison's figures against the full rescoring's
lookup   the lookup's tasks alone (workers/reuse.py) at 200k and 2M rows, each task in a fresh worker
         process (max_calls=1): wall time, peak RSS per task kind

The model is a small random GPT2 (2 layers, 64 wide, 128 positions) on the CPU, so that three nights of
200k documents fit in minutes: a row scored here costs far less than at the 3.5B shape on a GPU, while the
lookup and the job's start-up cost the same, so the ratio here is the harsher one.

python benchmarks/bench_reuse.py [--rows 200000] [--scale 200000,2000000] [--out results/reuse-cpu-2c-DATE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fengshen_batch.tiny_model import SAMPLE_LINES, build_tiny_gpt2

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_dedup import PeakRss  # noqa: E402  (a sibling script: the same per-task RSS sampler)

RESULTS = ["nll_sum", "token_count", "ppl", "byte_count", "bits_per_byte"]


def documents(n: int, rng: random.Random) -> list[str]:
    """n distinct documents of 1-6 sample lines (10-200 tokens), a number in each (so few repeat)."""
    return [" ".join(rng.choices(SAMPLE_LINES, k=rng.randint(1, 6))) + f" ({i})" for i in range(n)]


def write_files(folder: Path, texts: list[str], files: int, prefix: str, sources: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        part = texts[f::files]
        pq.write_table(pa.table({"text": part, "source": [sources[i % len(sources)] for i in range(len(part))],
                                 "fetched": [f"{prefix}-{i}" for i in range(len(part))]}),
                       folder / f"{prefix}-{f:03d}.parquet", row_group_size=4096)  # fmt: skip


def tonight(earlier: list[str], rng: random.Random) -> tuple[list[str], int]:
    """90% unchanged, 5% edited, 5% new, shuffled; and how many are unchanged."""
    texts = list(earlier)
    rng.shuffle(texts)
    n, k = len(texts), len(texts) // 20
    edited = [t + " 修订。" for t in texts[:k]]
    new = [" ".join(rng.choices(SAMPLE_LINES, k=rng.randint(1, 6))) + f" [new {i}]" for i in range(k)]
    out = edited + texts[k : n - k] + new
    rng.shuffle(out)
    return out, n - 2 * k


def score(model: Path, inp: Path, out: Path, **extra) -> tuple[dict, float]:
    from fengshen_batch.job.run import run_job
    from fengshen_batch.spec import build_spec

    fields = {"kind": "score", "model": str(model), "input": str(inp), "output": str(out), "actors": 2,
              "report_by": "source", "shard_rows": 4096, "dtype": "float32", **extra}  # fmt: skip
    t = time.time()
    manifest = run_job(build_spec(fields), progress=print, live=False)
    return manifest, time.time() - t


def close(a, b, path="", tolerance=0.0) -> list[str]:
    """Where two reports' figures differ by more than `tolerance` (relative; timings aside)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (a.keys() | b.keys()) - {"wall_seconds", "generated_at", "output", "url"}
        return [d for k in sorted(keys) for d in close(a.get(k), b.get(k), f"{path}.{k}", tolerance)]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in close(x, y, f"{path}[{i}]", tolerance)
        ]
    if isinstance(a, float) and isinstance(b, float):
        rel = abs(a - b) / max(abs(a), abs(b), 1e-12)
        return [] if rel <= tolerance else [f"{path}: {a} vs {b} ({rel:.1e})"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def night_run(rows: int, work: Path, threads: int) -> dict:
    import ray

    rng = random.Random(37)
    model = build_tiny_gpt2(work / "model", n_positions=128, n_embd=64, n_layer=2)
    earlier = documents(rows, rng)
    write_files(work / "night1", earlier, 8, "crawl-1201", ["news", "forum", "wiki"])
    texts, unchanged = tonight(earlier, rng)
    write_files(work / "night2", texts, 7, "crawl-1202", ["wiki", "forum", "news", "blog"])
    ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False)
    try:
        m1, t1 = score(model, work / "night1", work / "n1")
        compare = {"baseline": str(work / "n1"), "drift_threshold": {"ppl_change": 0.05, "bpb_change": 0.05}}
        full, t_full = score(model, work / "night2", work / "full", **compare)
        reuse, t_reuse = score(model, work / "night2", work / "reuse", reuse=[str(work / "n1")], **compare)
    finally:
        ray.shutdown()
    got = pq.read_table(work / "reuse" / "data", columns=["id", "text", "content_key", *RESULTS])
    ref = pq.read_table(work / "full" / "data", columns=["id", *RESULTS]).sort_by("id")
    last = pq.read_table(work / "n1" / "data", columns=["content_key", *RESULTS])
    first = np.unique(np.array(last.column("content_key").to_pylist()), return_index=True)
    by_key = dict(zip(first[0].tolist(), first[1].tolist(), strict=True))
    keys = got.column("content_key").to_pylist()
    hits = [i for i, k in enumerate(keys) if k in by_key]
    same = all(
        got.column(c).take(hits).equals(last.column(c).take([by_key[keys[i]] for i in hits])) for c in RESULTS
    )
    got = got.sort_by("id")
    nll = np.abs(got.column("nll_sum").to_numpy() - ref.column("nll_sum").to_numpy())
    reports = [json.loads((work / d / "report" / "summary.json").read_text()) for d in ("reuse", "full")]
    reports[0].pop("reuse")  # the reuse run's own figures (rows reused, rows scored): the rest must agree
    return {
        "rows": rows,
        "unchanged_rows": unchanged,
        "earlier_night_seconds": round(t1, 1),
        "full_rescoring_seconds": round(t_full, 1),
        "reuse_seconds": round(t_reuse, 1),
        "reuse_over_full": round(t_reuse / t_full, 3),
        "lookup_seconds": reuse["reuse"]["lookup_seconds"],
        "reused_rows": reuse["reuse"]["reused_rows"],
        "computed_rows": reuse["reuse"]["computed_rows"],
        "tokens_computed": {"full": full["counts"]["tokens"], "reuse": reuse["counts"]["tokens"]},
        "reused_rows_identical_to_earlier_output": same and len(hits) == reuse["reuse"]["reused_rows"],
        "max_abs_nll_sum_difference_vs_full": float(nll.max()),
        "max_rel_nll_sum_difference_vs_full": float((nll / np.abs(ref.column("nll_sum").to_numpy())).max()),
        "rows_differing_from_full": int((nll > 0).sum()),
        # a full rescoring batches rows otherwise than the earlier night did: float32 sums differ in the
        # last bits, so the report's figures agree to float32 rounding, not bit for bit
        "report_figures_differing_vs_full": len(close(reports[0], reports[1])),
        "report_figures_beyond_1e-6_vs_full": close(reports[0], reports[1], tolerance=1e-6),
        "drift_equal": reuse.get("drift") == full.get("drift"),
        "startup_seconds": {"full": full["startup"], "reuse": reuse["startup"]},
    }


def fake_output(folder: Path, keys: list[str], rng: np.random.Generator) -> list[str]:
    """An earlier output's data files (content_key and results, 4096 rows a file) for these keys."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for f, start in enumerate(range(0, len(keys), 4096)):
        part = keys[start : start + 4096]
        nll, tokens = rng.gamma(2, 200, len(part)), rng.integers(10, 400, len(part))
        path = folder / f"part-{f:06d}.parquet"
        pq.write_table(pa.table({"content_key": part, "nll_sum": nll, "token_count": tokens,
                                 "ppl": np.exp(nll / tokens), "byte_count": tokens * 3,
                                 "bits_per_byte": nll / (tokens * 3 * np.log(2))}), path)  # fmt: skip
        paths.append(str(path))
    return paths


def lookup_run(rows: int, work: Path, threads: int) -> dict:
    """The lookup alone: tonight's `rows` texts in 4096-row shards, an earlier output holding the keys of
    90% of them (and as many others), each task in a worker process of its own."""
    from types import SimpleNamespace

    import ray

    from fengshen_batch.io.storage import StorageSpec
    from fengshen_batch.kinds.reuse import ReuseSource, match_schema
    from fengshen_batch.kinds.score import content_key
    from fengshen_batch.workers.reuse import find_reused

    texts = [f"document {i} " + "文本" * (i % 7) for i in range(rows)]
    keys = [content_key(t) if i % 10 else f"{i:032x}" for i, t in enumerate(texts)]  # 10% not there
    paths = fake_output(work / "earlier" / "data", keys, np.random.default_rng(rows))
    inp = work / "tonight"
    write_files(inp, texts, max(1, rows // 200_000), "tonight", ["a"])
    shards = []
    for f in sorted(inp.glob("*.parquet")):
        n = pq.ParquetFile(f).metadata.num_rows
        shards += [{"index": len(shards) + i, "url": str(f), "name": f.name, "start": start,
                    "stop": min(n, start + 4096)} for i, start in enumerate(range(0, n, 4096))]  # fmt: skip
    spec = SimpleNamespace(
        storage=StorageSpec(), text_column="text", token_logprobs=False, reference_model=None
    )
    source = ReuseSource(str(work), str(work), {n: n for n in ["content_key", *RESULTS]}, paths, rows)
    out = work / "out"
    out.mkdir()
    ray.init(num_cpus=threads, include_dashboard=False, log_to_driver=False)
    try:
        with PeakRss() as rss:
            t = time.time()
            found = find_reused(
                spec, [source], shards, str(out), match_schema(spec), options={"max_calls": 1}
            )
            took = time.time() - t
    finally:
        ray.shutdown()
    return {"rows": rows, "found": found[0], "expected_found": sum(1 for i in range(rows) if i % 10),
            "seconds": round(took, 2), "peak_rss_per_task": rss.by_task()}  # fmt: skip


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--scale", default="200000,2000000")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--skip-night", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / f"reuse-cpu-2c-{time.strftime('%Y%m%d')}.json"))
    args = ap.parse_args()
    result = {"command": " ".join(sys.argv), "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_night:
            result["night"] = night_run(args.rows, Path(tmp) / "night", args.threads)
            print(json.dumps(result["night"], indent=1))
            Path(args.out).write_text(json.dumps(result, indent=1))
        result["lookup"] = []
        for n in [int(x) for x in args.scale.split(",") if x]:
            result["lookup"].append(lookup_run(n, Path(tmp) / f"lookup-{n}", args.threads))
            print(json.dumps(result["lookup"][-1], indent=1))
            Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
