"""The judge report under OUTPUT/report/: summary.json, margins.png and report.html (the chart embedded):
accuracy overall, per criterion and per `report_by` group, how sure the choices were (the winning margins),
and the labelled rows chosen wrong with the largest margins."""

from __future__ import annotations

import html
import json

import numpy as np

from ..io.outputs import DATA, OutputStore
from . import judge_sketch
from .histograms import BINS_PER_DECADE, group_label, groups_note
from .page import errors_table, figure, head, png_bytes, png_img
from .summaries import REPORT


def _margins_png(hist: dict, criterion: str) -> bytes:
    plt, fig, ax = figure()
    if hist["bins"]:
        bins = np.array(sorted(int(b) for b in hist["bins"]), dtype=np.int64)
        counts = np.array([hist["bins"][str(b)] for b in bins], dtype=np.float64)
        # about 40 bars: the log bins (200 a decade) grouped
        step = max(1, (int(bins[-1] - bins[0]) + 1) // 40)
        groups = (bins - bins[0]) // step
        lefts = 10 ** ((bins[0] + np.unique(groups) * step) / BINS_PER_DECADE)
        sums = np.bincount(groups, weights=counts)[np.unique(groups)]
        widths = lefts * (10 ** (step / BINS_PER_DECADE) - 1)
        ax.bar(lefts, sums, width=widths, align="edge", color="#3b6ea5")
        ax.set_xscale("log")
    ax.set_xlabel(f"winning margin ({criterion} of the runner-up minus the winner's, log scale)")
    ax.set_ylabel("rows")
    ax.set_title("How clear each choice was")
    return png_bytes(plt, fig)


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def _html(summary: dict, worst: list[dict], png: bytes, error_kinds: dict) -> str:
    per = "".join(
        f"<tr><th>accuracy by {html.escape(k)}{' (the job’s criterion)' if k == summary['criterion'] else ''}</th>"
        f"<td>{_pct(v)}</td></tr>"
        for k, v in summary["per_criterion"].items()
    )
    figures = (f"<tr><th>rows judged</th><td>{summary['rows']:,}</td></tr>"
               f"<tr><th>labelled rows</th><td>{summary['labelled_rows']:,}</td></tr>"
               f"<tr><th>labels naming no candidate</th><td>{summary['invalid_label_rows']:,}</td></tr>{per}"
               + "".join(f"<tr><th>margin {k}</th><td>{v:,.4g}</td></tr>"
                         for k, v in summary["margin_quantiles"].items() if k in ("p10", "p50", "p90")))  # fmt: skip
    groups = ""
    if summary.get("by"):
        by = html.escape(summary["by"])
        rows = "".join(
            f"<tr><td>{html.escape(group_label(g))}</td><td>{a['rows']:,}</td><td>{a['labelled_rows']:,}</td>"
            f"<td>{_pct(a['accuracy'])}</td></tr>"
            for g, a in sorted(summary["groups"].items(), key=lambda kv: (kv[1]["accuracy"] is None, kv[1]["accuracy"] or 0))
        )  # fmt: skip
        groups = (f"<h2>By {by}</h2><p class=note>Lowest accuracy first.</p><table><tr><th>{by}</th><th>rows</th>"
                  f"<th>labelled</th><th>accuracy</th></tr>{rows}</table>")  # fmt: skip
        if note := groups_note(summary):
            groups = f"<h2>By {by}</h2><p>{html.escape(note)}</p>"

    def margin(w) -> str:
        return "n/a" if w["margin"] is None else f"{w['margin']:,.4g}"

    body = "".join(
        f"<tr><td>{html.escape(str(w['id']))}</td><td>{margin(w)}</td>"
        f"<td class=t>{w['choice']}: {html.escape(w['chosen'])}</td><td class=t>{w['target']}: {html.escape(w['labelled'])}</td></tr>"
        for w in worst
    )  # fmt: skip
    wrong = (f"<h2>Confidently wrong: the {len(worst)} labelled rows chosen wrong by the largest margins</h2>"
             f"<table><tr><th>id</th><th>margin</th><th>chosen</th><th>the label's</th></tr>{body}</table>"
             if worst else "")  # fmt: skip
    return f"""{
        head(
            f"Judge report: {summary['model']}",
            "1100px",
            "td.t{max-width:420px;word-break:break-word} img{max-width:100%} p.note{color:#666;font-size:12px}",
        )
    }
<h1>Judge report</h1>
<p>Model <code>{html.escape(summary["model"])}</code>, input <code>{html.escape(summary["input"])}</code>. The
least surprising candidate wins (criterion <code>{html.escape(summary["criterion"])}</code>).</p>
<h2>Accuracy {_pct(summary["accuracy"])}</h2>
<table>{figures}</table>
{png_img(png, "histogram of the winning margins, log scale")}
{errors_table(error_kinds, summary["rows"] + sum(error_kinds.values()))}
{groups}
{wrong}
</body></html>
"""


def _from_files(store: OutputStore, spec: dict, by: str | None, summarize_table) -> dict:
    """The summary from the data files (shards summarised by an older version, or a report by another column),
    by the kind's `summarize_table(table, by)`."""
    prefix, id_field = spec.get("result_prefix") or "", spec.get("id_column") or "id"
    results = ["statements", "candidate_nll_sum", "candidate_token_count", "choice", "margin"]
    inputs = [c for c in (id_field, spec.get("label_column"), spec.get("answers_column"), by) if c]
    table = store.read(DATA, list(dict.fromkeys([*inputs, *(prefix + c for c in results)])))
    if table is None:
        raise ValueError(f"no data files under {store.url}/{DATA}: is this a job's output?")
    if by and by not in table.column_names:
        raise ValueError(f"column {by!r} is not in the output")
    table = table.rename_columns([n[len(prefix):] if n[len(prefix):] in results and n.startswith(prefix) else n
                                  for n in table.column_names])  # fmt: skip
    return summarize_table(table, by)


def build_judge_report(
    store: OutputStore, manifest: dict, by: str | None, summaries: list | None, summarize_table
) -> dict:
    """Write OUTPUT/report/ of a judge job from per-shard summaries (the data files' where those are missing
    or made for another `by`, by `summarize_table(table, by)`); return the summary (the manifest's `judge`
    figures are its accuracy)."""
    spec = manifest["spec"]
    fresh = bool(summaries) and all(s is not None and s.get("by") == by for s in summaries)
    merged = judge_sketch.merge(summaries) if fresh else _from_files(store, spec, by, summarize_table)
    criterion = spec.get("criterion") or "ppl"
    summary = {"model": manifest.get("model", ""), "input": spec.get("input", ""),
               **judge_sketch.figures(merged, criterion)}  # fmt: skip
    error_kinds = manifest.get("counts", {}).get("error_kinds", {})
    summary["errors"] = error_kinds
    png = _margins_png(merged["margin"], criterion)
    store.fs.makedirs(store.path_to(REPORT), exist_ok=True)
    store.fs.pipe_file(
        store.path_to(REPORT, "summary.json"), json.dumps(summary, indent=2, ensure_ascii=False).encode()
    )
    store.fs.pipe_file(store.path_to(REPORT, "margins.png"), png)
    page = _html(summary, merged["worst"], png, error_kinds)
    store.fs.pipe_file(store.path_to(REPORT, "report.html"), page.encode())
    return summary
