"""The scoring report under OUTPUT/report/: summary.json, ppl_histogram.png and report.html.

Built from mergeable per-shard summaries (`score_sketch.py`): the ones each shard's writer put in its marker, or,
to rebuild the report later for another `--by` column (`fengshen-batch report OUTPUT`), ones read from the
data files in parallel; never one pass over all rows. Corpus perplexity is exp(sum nll / sum tokens), the
token-weighted figure (lm-eval's `word_perplexity` analogue for tokens), not the mean of per-document
perplexities; it is exact, the quantiles are within 0.6% (the summaries' log-histogram bins).
"""

from __future__ import annotations

import html
import json

import numpy as np

from ..io.outputs import OutputStore
from . import score_sketch
from .baseline import SKETCH, Baseline, compare, comparison_html, drift
from .buckets import BUCKETS
from .duplicates import dedup_section
from .histograms import BINS_PER_DECADE, group_label, groups_note
from .page import errors_table, figure, head, png_bytes, png_img
from .score_sketch import figures
from .summaries import REPORT, merged_summary


def _histogram_png(hist: dict, corpus_ppl: float | None, baseline: dict | None = None) -> bytes:
    """The merged log-histogram of perplexity, drawn in about 40 bars between its min and max; a baseline's
    as an outline over it, both as shares of their documents."""
    from matplotlib.ticker import MaxNLocator

    plt, fig, ax = figure(3.6)
    if hist["bins"]:
        both = [h for h in (hist, baseline) if h and h["bins"]]
        lo = max(min(h["min"] for h in both), 1e-3)
        hi = max(max(h["max"] for h in both), 1.001)
        edges = (
            np.logspace(np.log10(lo), np.log10(hi * 1.0001), 41)
            if hi > lo
            else np.array([lo * 0.99, lo * 1.01])
        )

        def draw(h: dict, **style) -> None:
            fine = np.array([int(b) for b in h["bins"]], dtype=np.float64)
            counts = np.array(list(h["bins"].values()), dtype=np.float64)
            centers = 10 ** ((fine + 0.5) / BINS_PER_DECADE)  # each fine bin's documents at its middle
            weights = counts / counts.sum() if baseline else counts
            ax.hist(np.clip(centers, edges[0], edges[-1]), bins=edges, weights=weights, **style)

        draw(hist, color="#3b6ea5", edgecolor="white", linewidth=0.4, label="today" if baseline else None)
        if baseline and baseline["bins"]:
            draw(baseline, histtype="step", color="#222222", linewidth=1.4, label="baseline")
        ax.set_xscale("log")
        if corpus_ppl:
            ax.axvline(corpus_ppl, color="#c44e52", linestyle="--", label=f"corpus ppl {corpus_ppl:,.1f}")
            ax.legend(frameon=False)
    if baseline:
        ax.legend(frameon=False)
    ax.set_xlabel("perplexity per document (log scale)")
    ax.set_ylabel("share of documents" if baseline else "documents")
    if not baseline:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Perplexity distribution")
    return png_bytes(plt, fig)


def _html(summary: dict, low: list[dict], high: list[dict], png: bytes) -> str:
    def fmt(v):
        return f"{v:,.3f}" if isinstance(v, float) else html.escape(str(v))

    def table(rows: list[dict], caption: str) -> str:
        head = "".join(f"<th>{h}</th>" for h in ("id", "ppl", "bits/byte", "tokens", "text"))
        body = "".join(
            f"<tr><td>{html.escape(str(r['id']))}</td><td>{fmt(r['ppl'])}</td><td>{fmt(r['bits_per_byte'])}</td>"
            f"<td>{r['tokens']}</td><td class=t>{html.escape(r['text'][:300])}</td></tr>"
            for r in rows
        )
        return f"<h2>{caption}</h2><table><tr>{head}</tr>{body}</table>"

    figures = [("rows", summary["rows"]), ("errors", summary["errors"]), ("tokens", summary["tokens"]),
               ("corpus perplexity", summary["corpus_ppl"])]  # fmt: skip
    if summary.get("corpus_bits_per_byte") is not None:
        figures.append(("corpus bits per byte", summary["corpus_bits_per_byte"]))
    if reuse := summary.get("reuse"):
        figures += [("rows reused from earlier outputs", reuse["reused_rows"]),
                    ("rows scored tonight", reuse["computed_rows"])]  # fmt: skip
    if summary.get("duplicate_rate") is not None:  # rows whose text another row has too (beyond its first)
        approx = "" if summary.get("duplicate_rate_exact") else " (estimate)"
        figures.append((f"duplicate rate{approx}", f"{summary['duplicate_rate']:.2%}"))
    figures += [(f"ppl {k}", v) for k, v in summary["ppl_quantiles"].items()]
    figures += [(f"bits/byte {k}", v) for k, v in summary["bits_per_byte_quantiles"].items()]
    figures += [(f"bpb_diff {k}", v) for k, v in summary.get("bpb_diff_quantiles", {}).items()]
    stats = "".join(f"<tr><th>{html.escape(k)}</th><td>{fmt(v)}</td></tr>" for k, v in figures)
    groups = ""
    if summary.get("by"):
        rows = "".join(
            f"<tr><td>{html.escape(group_label(g))}</td><td>{s['rows']}</td><td>{s['tokens']}</td>"
            f"<td>{fmt(s['corpus_ppl'])}</td><td>{fmt(s['ppl_quantiles'].get('p50', ''))}</td></tr>"
            for g, s in summary["groups"].items()
        )
        groups = (f"<h2>By {html.escape(summary['by'])}</h2><table><tr><th>{html.escape(summary['by'])}</th>"
                  f"<th>rows</th><th>tokens</th><th>corpus ppl</th><th>median ppl</th></tr>{rows}</table>")  # fmt: skip
        if note := groups_note(summary):
            groups = f"<h2>By {html.escape(summary['by'])}</h2><p>{html.escape(note)}</p>"
    return f"""{
        head(
            f"Scoring report: {summary['model']}",
            "1100px",
            "td.t{max-width:640px;word-break:break-word} img{max-width:100%}",
        )
    }
<h1>Scoring report</h1>
<p>Model <code>{html.escape(summary["model"])}</code>, input <code>{html.escape(summary["input"])}</code>.</p>
{comparison_html(summary) if "comparison" in summary else ""}
{png_img(png, "histogram of per-document perplexity, log scale")}
<table>{stats}</table>
{errors_table(summary.get("error_kinds", {}), summary["rows"] + summary["errors"])}
{dedup_section(summary.get("near_duplicates"), summary["rows"])}
{groups}
{table(low, f"The {len(low)} lowest-perplexity documents")}
{table(high, f"The {len(high)} highest-perplexity documents")}
</body></html>
"""


def build_report(
    store: OutputStore,
    manifest: dict,
    by: str | None = None,
    summaries: list | None = None,
    baseline: Baseline | None = None,
    threshold: dict | None = None,
) -> dict:
    """Write OUTPUT/report/ from per-shard summaries (see `merged_summary`), compared with `baseline` if
    given (and its drift judged against `threshold`, a DriftThreshold's fields); return the summary."""
    spec = manifest["spec"]
    merged = merged_summary(
        store, score_sketch, spec.get("text_column"), by, summaries, bool(manifest.get("bucket_cutoffs")),
        spec.get("result_prefix") or "", spec.get("id_column") or "id",
    )  # fmt: skip
    counts = manifest.get("counts", {})  # the committed shards' counts
    summary = {"model": manifest.get("model", ""), "input": spec.get("input", ""), **figures(merged),
               "errors": counts.get("error_rows", 0), "error_kinds": counts.get("error_kinds", {})}  # fmt: skip
    if by:
        summary["by"] = by
        summary["groups"] = {g: figures(f) for g, f in merged["groups"].items()}
        if merged.get("groups_left_out"):
            summary["groups_left_out"] = merged["groups_left_out"]
    if manifest.get("dedup"):  # the near-duplicate step's figures (job/dedup.py)
        summary["near_duplicates"] = manifest["dedup"]
    if manifest.get("reuse"):  # rows whose results came from earlier outputs: in every figure as tonight's
        summary["reuse"] = {k: manifest["reuse"][k] for k in ("reused_rows", "computed_rows", "outputs")}
    if merged.get("buckets"):
        summary["buckets"] = {b: merged["buckets"].get(b, 0) for b in BUCKETS}
        summary["bucket_cutoffs"] = manifest.get("bucket_cutoffs")
    if baseline is not None:
        summary["comparison"] = compare(merged, baseline, by)
        if threshold:
            summary["drift"] = drift(summary["comparison"], threshold)
    store.fs.makedirs(store.path_to(REPORT), exist_ok=True)
    store.fs.pipe_file(store.path_to(REPORT, "summary.json"), json.dumps(summary, indent=2).encode())
    if by == spec.get("report_by"):  # what a later job compares itself with (not a rebuild for another by)
        sketch = {k: v for k, v in merged.items() if k not in ("low", "high")}  # sums, histograms; no texts
        store.fs.pipe_file(store.path_to(REPORT, SKETCH), json.dumps(sketch).encode())
    png = _histogram_png(merged["ppl"], summary["corpus_ppl"], baseline.sketch["ppl"] if baseline else None)
    store.fs.pipe_file(store.path_to(REPORT, "ppl_histogram.png"), png)
    page = _html(summary, merged["low"], merged["high"], png)
    store.fs.pipe_file(store.path_to(REPORT, "report.html"), page.encode())
    return summary
