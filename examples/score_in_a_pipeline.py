"""Perplexity as one step of your own Ray Data pipeline: read JSON lines, keep the long texts, score them,
keep the fluent ones, write Parquet. Run against a cluster with RAY_ADDRESS set, or alone (a local Ray).

    python examples/score_in_a_pipeline.py --model IDEA-CCNL/Wenzhong-GPT2-3.5B \\
        --input s3://crawl/2026-11-21/ --output s3://kept/2026-11-21/ --min-chars 200 --max-ppl 40 --actors 4

`make test` runs it on a tiny model (tests/test_processors.py).
"""

from __future__ import annotations

import argparse
import math

import ray

import fengshen_batch as fb


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="local dir, s3:// prefix or hub id")
    ap.add_argument("--input", required=True, help="JSON lines with a `text` field (a file or a folder)")
    ap.add_argument("--output", required=True, help="a folder or prefix for the Parquet files")
    ap.add_argument("--min-chars", type=int, default=1, help="texts shorter than this are not scored")
    ap.add_argument("--max-ppl", type=float, default=math.inf, help="texts above this perplexity are dropped")
    ap.add_argument("--actors", type=int, default=1, help="model replicas (one GPU each on a GPU cluster)")
    args = ap.parse_args(argv)

    ds = ray.data.read_json(args.input).filter(lambda row: len(row["text"] or "") >= args.min_chars)
    ds = fb.score(ds, model=args.model, actors=args.actors)  # + nll_sum, ppl, ..., error_kind, error_message
    ds = ds.filter(lambda row: row["error_kind"] is None and row["ppl"] <= args.max_ppl)
    ds.write_parquet(args.output)


if __name__ == "__main__":
    main()
