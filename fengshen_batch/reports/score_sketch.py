"""Mergeable summaries of scored rows: the report and the quantile buckets without a pass over the output.

The actor that writes a shard summarises it (`summarize`); the summary rides in the shard's commit record
into its marker, and the driver merges the markers' summaries (`merge`), in memory O(shards x bins), never
O(rows). A summary holds:
- exact sums: rows, tokens, NLL (so the corpus perplexity exp(sum nll / sum tokens) is exact);
- log-histograms of per-document perplexity and bits per byte, 200 bins per decade: a quantile read from
  them is the geometric middle of its bin, within 0.6% of the exact quantile (and inside [min, max]);
  with a reference model, a linear histogram of bpb_diff (bins of 0.001 bits per byte);
- the EXAMPLES lowest- and highest-perplexity documents, each text once (exact after merging: each shard
  keeps its own);
- the distinct texts (`distinct.py`: exact up to 1,024, then HyperLogLog), for the duplicate rate;
- the same figures per value of the report's `by` column (nulls their own group; at most MAX_GROUPS values).
"""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.compute as pc

from ..io.outputs import sum_counts
from . import distinct
from .buckets import bucket_counts
from .generate_sketch import normalize
from .histograms import group_keys, histogram, merge_groups, merge_histograms, quantiles

EXAMPLES = 20
KIND = "score"
# The result columns a summary reads (by their own names), and the one that marks a score job's output.
RESULTS = ["nll_sum", "token_count", "ppl", "byte_count", "bits_per_byte", "bucket", "bpb_diff"]
MARKER = "ppl"


TEXT_CHARS = 300  # of each example document


BPB_DIFF_WIDTH = 0.001  # bits per byte: the linear bins of bpb_diff (signed, so no log scale)


def _figures(table: pa.Table) -> dict:
    out = {
        "rows": table.num_rows,
        "tokens": int(pc.sum(table.column("token_count")).as_py() or 0),
        "nll_sum": float(pc.sum(table.column("nll_sum")).as_py() or 0.0),
        **(
            {"bytes": int(pc.sum(table.column("byte_count")).as_py() or 0)}
            if "byte_count" in table.column_names
            else {}
        ),
        "ppl": histogram(table.column("ppl").to_numpy()),
        "bits_per_byte": histogram(table.column("bits_per_byte").to_numpy()),
    }
    if "bpb_diff" in table.column_names:  # a reference model scored the texts too
        out["bpb_diff"] = histogram(table.column("bpb_diff").to_numpy(), BPB_DIFF_WIDTH)
    return out


def _merge_figures(figures: list[dict]) -> dict:
    out = {
        "rows": sum(f["rows"] for f in figures),
        "tokens": sum(f["tokens"] for f in figures),
        "nll_sum": math.fsum(f["nll_sum"] for f in figures),
        "ppl": merge_histograms([f["ppl"] for f in figures]),
        "bits_per_byte": merge_histograms([f["bits_per_byte"] for f in figures]),
    }
    if any("bpb_diff" in f for f in figures):
        out["bpb_diff"] = merge_histograms([f["bpb_diff"] for f in figures if "bpb_diff" in f])
    if all("bytes" in f for f in figures):  # summaries of older versions have no byte count
        out["bytes"] = sum(f["bytes"] for f in figures)
    return out


def _distinct_texts(rows: list[dict], key) -> list[dict]:
    """The rows whose example text has not been seen before, in order, at most EXAMPLES: a corpus with one
    text copied a thousand times shows it once, not as every one of its lowest documents."""
    seen, out = set(), []
    for r in rows:
        k = normalize(r["text"])
        if k not in seen:
            seen.add(k)
            out.append(r)
            if len(out) == EXAMPLES:
                break
    return sorted(out, key=key)


def _examples(table: pa.Table, text_column: str | None, lowest: bool, id_column: str) -> list[dict]:
    order = pc.sort_indices(table, sort_keys=[("ppl", "ascending" if lowest else "descending")])
    rows = table.take(order[: EXAMPLES * 8]).to_pylist()  # room for copies of one text among them
    rows = [
        {"id": r[id_column], "ppl": r["ppl"], "bits_per_byte": r["bits_per_byte"], "tokens": r["token_count"],
         "text": ((r.get(text_column) or "") if text_column else "")[:TEXT_CHARS]}
        for r in rows
    ]  # fmt: skip
    return _distinct_texts(rows, _order(lowest))


def _order(lowest: bool):
    return lambda r: (r["ppl"] if lowest else -r["ppl"], str(r["id"]))


def summarize(data: pa.Table, text_column: str | None, by: str | None, id_column: str = "id") -> dict:
    """The summary of one shard's (or file's) data rows; `id_column` names the example documents."""
    summary = {**_figures(data), "low": _examples(data, text_column, True, id_column),
               "high": _examples(data, text_column, False, id_column)}  # fmt: skip
    if text_column:  # exact duplicates (NFKC, casefolded, whitespace collapsed): how much of it is copies
        texts = data.column(text_column).to_pylist()
        summary["texts"] = distinct.sketch(distinct.stable_hashes(normalize(t or "") for t in texts))
    if "bucket" in data.column_names:
        summary["buckets"] = bucket_counts(data.column("bucket"))
    if by:
        keys, n_groups = group_keys(data.column(by))
        groups = {}
        for key in sorted(set(keys or [])):
            mask = pa.array([k == key for k in keys], pa.bool_())
            groups[key] = _figures(data.filter(mask))
        summary["by"], summary["groups"] = by, groups
        if keys is None:
            summary["groups_left_out"] = n_groups
    return summary


def merge(summaries: list[dict]) -> dict:
    """One summary of many (shards'); the examples stay the EXAMPLES lowest and highest overall."""
    merged = _merge_figures(summaries)

    def top(key: str, lowest: bool) -> list[dict]:
        rows = [r for s in summaries for r in s[key]]
        return _distinct_texts(sorted(rows, key=_order(lowest)), _order(lowest))

    merged["low"], merged["high"] = top("low", True), top("high", False)
    if summaries and all("texts" in s for s in summaries):  # (older versions' summaries have none)
        merged["texts"] = distinct.merge([s["texts"] for s in summaries])
    if any("buckets" in s for s in summaries):
        merged["buckets"] = sum_counts([s.get("buckets", {}) for s in summaries])
    merged.update(merge_groups(summaries, _merge_figures))
    return merged


def figures(summary: dict) -> dict:
    """What the report shows of a (merged) summary's figures."""
    tokens = summary["tokens"]
    return {
        "rows": summary["rows"],
        "tokens": tokens,
        "corpus_ppl": math.exp(summary["nll_sum"] / tokens) if tokens else None,
        # bits per byte of the whole corpus: all its NLL over all its UTF-8 bytes (comparable across tokenizers)
        **(
            {
                "corpus_bits_per_byte": summary["nll_sum"] / math.log(2) / summary["bytes"]
                if summary["bytes"]
                else None
            }
            if "bytes" in summary
            else {}
        ),  # fmt: skip
        **(
            {
                "duplicate_rate": 1 - distinct.count(summary["texts"]) / summary["rows"]
                if summary["rows"]
                else 0.0,
                "duplicate_rate_exact": distinct.is_exact(summary["texts"]),
            }
            if "texts" in summary
            else {}
        ),  # fmt: skip
        "ppl_quantiles": quantiles(summary["ppl"]),
        "bits_per_byte_quantiles": quantiles(summary["bits_per_byte"]),
        **({"bpb_diff_quantiles": quantiles(summary["bpb_diff"])} if "bpb_diff" in summary else {}),
    }
