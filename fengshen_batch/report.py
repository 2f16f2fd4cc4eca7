"""The scoring report under OUTPUT/report/: summary.json, ppl_histogram.png and report.html.

Built from the committed output Parquet (never from memory), so `fengshen-batch report OUTPUT` rebuilds it
later without rescoring. Corpus perplexity is exp(sum nll / sum tokens), the token-weighted figure
(lm-eval's `word_perplexity` analogue for tokens), not the mean of per-document perplexities.
Optional buckets label each row head/middle/tail by perplexity (CCNet's split): by quantile cutoffs of the
corpus, or by fixed perplexity thresholds; the data files then carry a `bucket` column.
"""

from __future__ import annotations

import html
import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .outputs import DATA, ERRORS, OutputStore

QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
EXAMPLES = 20
REPORT = "report"
BUCKETS = ("head", "middle", "tail")


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {}
    return {f"p{round(q * 100):02d}": float(np.quantile(values, q)) for q in QUANTILES}


def _figures(table: pa.Table) -> dict:
    nll = table.column("nll_sum").to_numpy()
    tokens = table.column("token_count").to_numpy()
    total_tokens = int(tokens.sum())
    return {
        "rows": table.num_rows,
        "tokens": total_tokens,
        "corpus_ppl": math.exp(float(nll.sum()) / total_tokens) if total_tokens else None,
        "ppl_quantiles": _quantiles(table.column("ppl").to_numpy()),
        "bits_per_byte_quantiles": _quantiles(table.column("bits_per_byte").to_numpy()),
    }


def bucket_cutoffs(ppl: np.ndarray, quantiles=None, thresholds=None) -> list[float] | None:
    """Perplexity cutoffs (head <= c0 < middle <= c1 < tail) from quantiles of `ppl` or fixed thresholds."""
    if thresholds:
        return [float(t) for t in thresholds]
    if quantiles and len(ppl):
        return [float(np.quantile(ppl, q)) for q in quantiles]
    return None


def apply_buckets(store: OutputStore, cutoffs: list[float]) -> None:
    """Add (or replace) the `bucket` column in every data file; runs before _SUCCESS is written."""
    for path in store.files(DATA):
        table = pq.read_table(store.fs.open(path, "rb"))
        if "bucket" in table.column_names:
            table = table.drop_columns(["bucket"])
        idx = np.searchsorted(np.asarray(cutoffs), table.column("ppl").to_numpy(), side="left")
        bucket = pa.array([BUCKETS[i] for i in idx], pa.string())
        with store.fs.open(path, "wb") as f:
            pq.write_table(table.append_column("bucket", bucket), f)


def _histogram_png(ppl: np.ndarray, corpus_ppl: float | None) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    if len(ppl):
        lo, hi = max(float(ppl.min()), 1e-3), max(float(ppl.max()), 1.001)
        bins = np.logspace(np.log10(lo), np.log10(hi * 1.0001), 40) if hi > lo else 10
        ax.hist(ppl, bins=bins, color="#3b6ea5", edgecolor="white", linewidth=0.4)
        ax.set_xscale("log")
        if corpus_ppl:
            ax.axvline(corpus_ppl, color="#c44e52", linestyle="--", label=f"corpus ppl {corpus_ppl:,.1f}")
            ax.legend(frameon=False)
    ax.set_xlabel("perplexity per document (log scale)")
    ax.set_ylabel("documents")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Perplexity distribution")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _examples(table: pa.Table, text_column: str | None, lowest: bool) -> list[dict]:
    order = pc.sort_indices(table, sort_keys=[("ppl", "ascending" if lowest else "descending")])
    rows = table.take(order[:EXAMPLES]).to_pylist()
    return [
        {"id": r["id"], "ppl": r["ppl"], "bits_per_byte": r["bits_per_byte"], "tokens": r["token_count"],
         "text": (r.get(text_column) or "") if text_column else ""}
        for r in rows
    ]  # fmt: skip


def _html(summary: dict, low: list[dict], high: list[dict]) -> str:
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
    figures += [(f"ppl {k}", v) for k, v in summary["ppl_quantiles"].items()]
    figures += [(f"bits/byte {k}", v) for k, v in summary["bits_per_byte_quantiles"].items()]
    stats = "".join(f"<tr><th>{html.escape(k)}</th><td>{fmt(v)}</td></tr>" for k, v in figures)
    groups = ""
    if summary.get("by"):
        rows = "".join(
            f"<tr><td>{html.escape(str(g))}</td><td>{s['rows']}</td><td>{s['tokens']}</td>"
            f"<td>{fmt(s['corpus_ppl'])}</td><td>{fmt(s['ppl_quantiles'].get('p50', ''))}</td></tr>"
            for g, s in summary["groups"].items()
        )
        groups = (f"<h2>By {html.escape(summary['by'])}</h2><table><tr><th>{html.escape(summary['by'])}</th>"
                  f"<th>rows</th><th>tokens</th><th>corpus ppl</th><th>median ppl</th></tr>{rows}</table>")  # fmt: skip
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Scoring report: {html.escape(summary["model"])}</title>
<style>
body{{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}} td,th{{border-bottom:1px solid #ddd;padding:3px 10px;
text-align:left;vertical-align:top}} td.t{{max-width:640px;word-break:break-word}} img{{max-width:100%}}
</style></head><body>
<h1>Scoring report</h1>
<p>Model <code>{html.escape(summary["model"])}</code>, input <code>{html.escape(summary["input"])}</code>.</p>
<img src="ppl_histogram.png" alt="histogram of per-document perplexity, log scale">
<table>{stats}</table>
{groups}
{table(low, f"The {len(low)} lowest-perplexity documents")}
{table(high, f"The {len(high)} highest-perplexity documents")}
</body></html>
"""


def build_report(store: OutputStore, manifest: dict, by: str | None = None) -> dict:
    """Write OUTPUT/report/ from the output's data and errors; return the summary."""
    spec = manifest["spec"]
    text_column = spec.get("text_column")
    table = store.read(DATA)
    errors = store.read(ERRORS, ["id"])
    if table is None:
        raise ValueError(f"no data files under {store.url}/{DATA}: is this a score job's output?")
    if "ppl" not in table.column_names:
        raise ValueError(f"{store.url} is not the output of a score job (no ppl column)")
    summary = {"model": manifest.get("model", ""), "input": spec.get("input", ""), **_figures(table),
               "errors": errors.num_rows if errors is not None else 0}  # fmt: skip
    if by:
        if by not in table.column_names:
            raise ValueError(f"column {by!r} is not in the output (columns: {', '.join(table.column_names)})")
        summary["by"] = by
        summary["groups"] = {
            str(g): _figures(table.filter(pc.equal(table.column(by), g)))
            for g in sorted(pc.unique(table.column(by)).to_pylist(), key=str)
            if g is not None
        }
    if "bucket" in table.column_names:
        summary["buckets"] = {
            b: int(pc.sum(pc.equal(table.column("bucket"), b)).as_py() or 0) for b in BUCKETS
        }
        summary["bucket_cutoffs"] = manifest.get("bucket_cutoffs")
    ppl = table.column("ppl").to_numpy()
    store.fs.makedirs(store._p(REPORT), exist_ok=True)
    store.fs.pipe_file(store._p(REPORT, "summary.json"), json.dumps(summary, indent=2).encode())
    store.fs.pipe_file(store._p(REPORT, "ppl_histogram.png"), _histogram_png(ppl, summary["corpus_ppl"]))
    page = _html(summary, _examples(table, text_column, True), _examples(table, text_column, False))
    store.fs.pipe_file(store._p(REPORT, "report.html"), page.encode())
    return summary
