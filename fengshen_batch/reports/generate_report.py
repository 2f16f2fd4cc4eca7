"""The generation report under OUTPUT/report/: summary.json, lengths.png, nll_per_token.png and report.html.

What a synthetic-data team looks at before training on the samples: how long they are and how many hit
their limit (per finish_reason), how likely the model found them (NLL per generated token), duplicates,
prompts whose samples collapsed into one text, distinct-1/2, degenerate loops, and example samples with
their prompts. Built like the scoring report (`score_report.py`), from the shards' mergeable summaries
(`generate_sketch.py`); `fengshen-batch report OUTPUT --by COLUMN` rebuilds it from the data files.
"""

from __future__ import annotations

import html
import json

import numpy as np

from ..io.outputs import OutputStore
from . import generate_sketch
from .duplicates import dedup_section
from .generate_sketch import NLL_WIDTH, figures
from .histograms import group_label, groups_note
from .page import errors_table, figure, head, png_bytes, png_img
from .summaries import REPORT, merged_summary

FINISH_COLORS = {"stop": "#3b6ea5", "length": "#c44e52"}


def _bars(hist: dict, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(values, counts) of a linear histogram's bins, each bin at its lower edge times `scale`."""
    bins = np.array([int(b) for b in hist["bins"]], dtype=np.float64)
    return bins * scale, np.array(list(hist["bins"].values()), dtype=np.float64)


def lengths_png(finish: dict) -> bytes:
    """Generated tokens per sample, stacked by finish_reason, in about 40 bars."""
    plt, fig, ax = figure()
    hists = {r: f["generated_tokens"] for r, f in sorted(finish.items()) if f["generated_tokens"]["bins"]}
    if hists:
        lo = min(h["min"] for h in hists.values())
        hi = max(h["max"] for h in hists.values())
        edges = np.linspace(lo, hi + 1, min(41, int(hi - lo) + 2))
        values, weights = zip(*(_bars(h, 1.0) for h in hists.values()), strict=True)
        colors = [FINISH_COLORS.get(r, "#8c8c8c") for r in hists]
        ax.hist(values, bins=edges, weights=weights, stacked=True, label=list(hists), color=colors,
                edgecolor="white", linewidth=0.4)  # fmt: skip
        ax.legend(frameon=False, title="finish_reason")
    ax.set_xlabel("generated tokens per sample")
    ax.set_ylabel("samples")
    ax.set_title("Sample lengths")
    return png_bytes(plt, fig)


def nll_png(hist: dict, mean: float | None) -> bytes:
    """NLL per generated token per sample, in about 40 bars."""
    plt, fig, ax = figure()
    if hist["bins"]:
        values, counts = _bars(hist, NLL_WIDTH)
        lo, hi = hist["min"], hist["max"]
        edges = np.linspace(lo, hi + NLL_WIDTH, 41) if hi > lo else np.array([lo - 0.01, hi + 0.01])
        ax.hist(np.clip(values + NLL_WIDTH / 2, edges[0], edges[-1]), bins=edges, weights=counts,
                color="#3b6ea5", edgecolor="white", linewidth=0.4)  # fmt: skip
        if mean is not None:
            ax.axvline(mean, color="#c44e52", linestyle="--", label=f"all tokens {mean:.3f}")
            ax.legend(frameon=False)
    ax.set_xlabel("NLL per generated token (nats)")
    ax.set_ylabel("samples")
    ax.set_title("How likely the model found its samples")
    return png_bytes(plt, fig)


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return html.escape(f"{v:,}" if isinstance(v, int) else str(v))


def _examples_table(rows: list[dict], caption: str) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("id", "#", "prompt", "generation", "NLL/token", "tokens",
                                            "finish", "loop words"))  # fmt: skip
    body = "".join(
        f"<tr><td>{html.escape(str(r['id']))}</td><td>{r['sample_index']}</td>"
        f"<td class=t>{html.escape(r['prompt'])}</td><td class=t>{html.escape(r['generation'])}</td>"
        f"<td>{_fmt(r['nll_per_token'])}</td><td>{r['generated_tokens']}</td>"
        f"<td>{html.escape(r['finish_reason'])}</td><td>{r['loop_words'] or ''}</td></tr>"
        for r in rows
    )
    return f"<h2>{html.escape(caption)}</h2><table><tr>{head}</tr>{body}</table>" if rows else ""


def _few_shot_rows(f: dict | None) -> list[tuple[str, object]]:
    if not f:
        return []
    return [
        ("few-shot headers (distinct example lists)", f["distinct_headers"]),
        ("examples used", f["examples_used"]),
        ("prompt tokens from the prefix cache", f["prefix_cache_hit_rate"]),
    ]


def _few_shot_groups(summary: dict) -> str:
    """Per report_by group (a stratum, with report_by: stratify_by): prompts, headers, the cache's share."""
    groups = {g: s for g, s in (summary.get("groups") or {}).items() if s.get("few_shot")}
    if not groups:
        return ""
    by = html.escape(summary["by"])
    rows = "".join(
        f"<tr><td>{html.escape(group_label(g))}</td><td>{_fmt(s['prompts'])}</td>"
        f"<td>{_fmt(s['few_shot']['distinct_headers'])}</td><td>{_fmt(s['few_shot']['examples_used'])}</td>"
        f"<td>{_fmt(s['few_shot']['prefix_cache_hit_rate'])}</td></tr>"
        for g, s in groups.items()
    )
    return (f"<h2>Few-shot by {by}</h2><table><tr><th>{by}</th><th>prompts</th><th>headers</th>"
            f"<th>examples used</th><th>prefix-cache hit rate</th></tr>{rows}</table>")  # fmt: skip


def _constraint_rows(c: dict | None) -> list[tuple[str, object]]:
    if not c:
        return []
    return [
        ("constrained samples", c["samples"]),
        ("valid (constraint satisfied)", c["satisfied"]),
        ("cut by the token limit before complete", c["cut"]),
        ("failed otherwise", c["failed"]),
    ]


def _html(summary: dict, examples: dict, pngs: tuple[bytes, bytes]) -> str:
    exact = summary["exact"]

    def estimate(key: str) -> str:
        return "" if exact[key] else " (estimate, HyperLogLog ±0.8%)"

    figures_rows = [
        ("samples", summary["samples"]),
        ("prompts", summary["prompts"]),
        ("error rows", sum(summary["errors"].values())),  # by kind: the errors table
        *(
            [("samples dropped by keep_best", summary["dropped_samples"])]
            if "dropped_samples" in summary
            else []
        ),
        ("generated tokens", summary["generated_tokens"]["sum"]),
        ("share that hit the token limit", summary["limit_hit_fraction"]),
        ("NLL per token, all tokens", summary["nll_per_token"]["mean"]),
        ("duplicate samples" + estimate("duplicate_samples"), summary["duplicate_samples"]),
        ("prompts whose samples are all one text", summary["collapsed_prompts"]),
        ("distinct-1" + estimate("distinct_1"), summary["distinct_1"]),
        ("distinct-2" + estimate("distinct_2"), summary["distinct_2"]),
        ("samples with a repetition loop", summary["repetition_loops"]),
        *_constraint_rows(summary.get("constraint")),
        *_few_shot_rows(summary.get("few_shot")),
    ]
    stats = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in figures_rows)
    qs = ("p05", "p25", "p50", "p75", "p95")
    lengths = [("all", summary["samples"], summary["generated_tokens"]["quantiles"])]
    lengths += [
        (r, f["samples"], f["quantiles"]) for r, f in summary["generated_tokens"]["by_finish_reason"].items()
    ]
    length_rows = "".join(
        f"<tr><td>{html.escape(r)}</td><td>{_fmt(n)}</td>" + "".join(f"<td>{_fmt(q.get(k))}</td>" for k in qs)
        + "</tr>"
        for r, n, q in lengths
    )  # fmt: skip
    qhead = "".join(f"<th>{k}</th>" for k in qs)
    groups = ""
    if summary.get("by"):
        by = html.escape(summary["by"])
        rows = "".join(
            f"<tr><td>{html.escape(group_label(g))}</td><td>{_fmt(s['samples'])}</td><td>{_fmt(s['prompts'])}</td>"
            f"<td>{_fmt(s['generated_tokens']['quantiles'].get('p50'))}</td><td>{_fmt(s['limit_hit_fraction'])}</td>"
            f"<td>{_fmt(s['nll_per_token']['mean'])}</td><td>{_fmt(s['duplicate_samples'])}</td>"
            f"<td>{_fmt(s['distinct_2'])}</td><td>{_fmt(s['repetition_loops'])}</td></tr>"
            for g, s in summary["groups"].items()
        )
        groups = (f"<h2>By {by}</h2><table><tr><th>{by}</th><th>samples</th><th>prompts</th><th>median tokens</th>"
                  f"<th>hit limit</th><th>NLL/token</th><th>duplicates</th><th>distinct-2</th><th>loops</th></tr>"
                  f"{rows}</table>")  # fmt: skip
        if note := groups_note(summary):
            groups = f"<h2>By {by}</h2><p>{html.escape(note)}</p>"
        else:
            groups += _few_shot_groups(summary)
    tables = "".join(
        _examples_table(examples[key], caption)
        for key, caption in (
            ("random", "A random handful (the same on every rebuild)"),
            ("lowest_nll", "Lowest NLL per token: what the model found likeliest"),
            ("highest_nll", "Highest NLL per token: the least likely samples"),
            ("longest_loops", "Longest repetition loops"),
        )
    )
    return f"""{
        head(
            f"Generation report: {summary['model']}",
            "1200px",
            "td.t{max-width:420px;word-break:break-word;white-space:pre-wrap} img{max-width:49%} "
            "p.note{color:#666;font-size:12px;max-width:800px}",
        )
    }
<h1>Generation report</h1>
<p>Model <code>{html.escape(summary["model"])}</code>, input <code>{html.escape(summary["input"])}</code>.</p>
{png_img(pngs[0], "histogram of generated tokens per sample by finish reason")}
{png_img(pngs[1], "histogram of NLL per generated token")}
<table>{stats}</table>
{errors_table(summary["errors"], summary["prompts"] + sum(summary["errors"].values()))}
<p class=note>Words: each CJK character is one, any other run of letters or digits is one, each punctuation mark
is one. A repetition loop: a block of 1 to 32 words repeated back to back 4 or more times over 16 or more words.
Duplicates compare texts after NFKC, casefolding and collapsing whitespace. Estimates: a HyperLogLog of the
texts' or n-grams' hashes, standard error 0.81% of the distinct count.</p>
<h2>Generated tokens per sample</h2>
<table><tr><th>finish_reason</th><th>samples</th>{qhead}</tr>{length_rows}</table>
{dedup_section(summary.get("near_duplicates"), summary["samples"])}
{groups}
{tables}
</body></html>
"""


def build_sample_report(
    store: OutputStore, manifest: dict, by: str | None = None, summaries: list | None = None
) -> dict:
    """Write OUTPUT/report/ of a generate job from per-shard summaries (the shards' own, or the data
    files' where those do not fit `by`); return the summary."""
    spec = manifest["spec"]
    merged = merged_summary(
        store, generate_sketch, prompt_column(spec), by, summaries, prefix=spec.get("result_prefix") or "",
        id_column=spec.get("id_column") or "id",
    )  # fmt: skip
    counts = manifest.get("counts", {})
    summary = {"model": manifest.get("model", ""), "input": spec.get("input", ""), **figures(merged),
               "errors": counts.get("error_kinds", {})}  # fmt: skip
    if spec.get("keep_best"):
        summary["dropped_samples"] = counts.get("dropped_samples", 0)
    if manifest.get("dedup"):  # the near-duplicate step's figures (job/dedup.py), not a pass over data/
        summary["near_duplicates"] = manifest["dedup"]
    if by:
        summary["by"] = by
        summary["groups"] = {g: figures(f) for g, f in merged["groups"].items()}
        if merged.get("groups_left_out"):
            summary["groups_left_out"] = merged["groups_left_out"]
    store.fs.makedirs(store.path_to(REPORT), exist_ok=True)
    store.fs.pipe_file(
        store.path_to(REPORT, "summary.json"), json.dumps(summary, indent=2, ensure_ascii=False).encode()
    )
    pngs = lengths_png(merged["finish"]), nll_png(merged["nll_per_token"], summary["nll_per_token"]["mean"])
    store.fs.pipe_file(store.path_to(REPORT, "lengths.png"), pngs[0])
    store.fs.pipe_file(store.path_to(REPORT, "nll_per_token.png"), pngs[1])
    store.fs.pipe_file(
        store.path_to(REPORT, "report.html"), _html(summary, merged["examples"], pngs).encode()
    )
    return summary


def prompt_column(spec: dict) -> str | None:
    """The output column holding each sample's prompt text: the input's, or the filled-in template's
    (None when the template's prompt is not kept)."""
    if spec.get("prompt_template") and spec.get("keep_prompt") is False:
        return None
    return spec.get("prompt_column") or "prompt"
