"""Compare a score job with an earlier one (its baseline) and say whether the corpus drifted.

A corpus scored nightly is scored to notice when it changes: a crawler pulling boilerplate, a source gone
bad, a filter changed upstream. The baseline is read from what its job left beside its rows: manifest.json
(model, fingerprint, spec, bucket cutoffs) and report/sketch.json, the merged summary its report was built
from (exact sums and 200-bins-per-decade log-histograms, overall and per report_by group); for an output
older than sketch.json, its markers' per-shard summaries. Never its rows.

The comparison (summary.json's `comparison`):
- corpus perplexity and bits per byte, today's and the baseline's, and the relative change (today /
  baseline - 1), exact;
- quantiles of per-document perplexity and their changes, each within half a bin (0.6%);
- the Kolmogorov-Smirnov distance between the two perplexity distributions, evaluated at the bin edges the
  two histograms share (200 per decade, 1.16% apart): never above the exact statistic, and at most
  `ks_bound` below it (the largest share of either side's documents in one bin);
- the same per report_by group, largest change first, and the groups only one side has;
- where the baseline cut buckets, today's share of documents in its head/middle/tail, at bin resolution.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass

import numpy as np

from ..errors import JobError
from ..io.outputs import OutputStore
from ..io.redact import redact_url
from ..io.storage import StorageSpec
from . import score_sketch
from .histograms import BINS_PER_DECADE, bin_middle
from .score_sketch import figures, merge

DRIFT_EXIT_CODE = 3  # the job finished, its output is complete, and it drifted past drift_threshold
SKETCH = "sketch.json"  # under OUTPUT/report/: the merged summary a later job compares with


class BaselineMissing(JobError):
    """The baseline is not a finished output (nothing there yet, or its job has not finished)."""


@dataclass(frozen=True)
class Baseline:
    url: str  # redacted: it is written into reports
    manifest: dict
    sketch: dict  # the baseline's merged summary (`score_sketch.merge`)


def differences(manifest: dict, record: dict, fingerprint: dict) -> list[str]:
    """What makes a baseline's perplexities incomparable with today's: another model, config, tokenizer or
    stride (a fingerprint part missing on either side is not compared: outputs of older versions)."""
    out = []
    if manifest.get("model") != record.get("model"):
        out.append(f"model {manifest.get('model')} (today {record.get('model')})")
    theirs = manifest.get("model_fingerprint") or {}
    for part, files in (
        ("config", "config.json"),
        ("tokenizer", "tokenizer.json or vocab.json + merges.txt"),
    ):
        if theirs.get(part) and fingerprint.get(part) and theirs[part] != fingerprint[part]:
            out.append(f"{part} ({files} differ)")
    stride = manifest.get("spec", {}).get("stride")
    if stride != record.get("stride"):
        out.append(f"stride {stride or 'the context'} (today {record.get('stride') or 'the context'})")
    return out


def load_baseline(
    url: str, storage: StorageSpec, record: dict, fingerprint: dict, check: bool = True
) -> Baseline:
    """The baseline at `url`, checked against today's spec `record` and model `fingerprint` (unless `check` is
    false): a JobError names what is missing or differs. Cheap: manifest, sketch or markers only."""
    shown = redact_url(url)
    store = OutputStore(url, storage)
    try:
        manifest = store.published_manifest()
    except Exception as e:
        raise JobError(f"cannot read the baseline {shown}: {type(e).__name__}: {e}") from None
    if manifest is None:
        raise BaselineMissing(f"baseline {shown} has no _SUCCESS: it is not a finished job's output")
    kind = manifest.get("spec", {}).get("kind", "score")
    if kind != score_sketch.KIND:  # what a baseline holds is a score job's sketch
        raise JobError(f"baseline {shown} is the output of a {kind} job; a baseline is a score job's output")
    if check and (differs := differences(manifest, record, fingerprint)):
        raise JobError(
            f"baseline {shown} was scored with another {'; '.join(differs)}: its perplexities are not "
            "comparable with today's. Set baseline_check: false (--no-baseline-check) to compare anyway"
        )
    path = store.path_to("report", SKETCH)
    if store.fs.exists(path):
        return Baseline(shown, manifest, json.loads(store.fs.cat_file(path)))
    summaries = [m.get("summary") for m in store.committed().values()]
    if not summaries or any(s is None for s in summaries):
        raise JobError(
            f"baseline {shown} has no report/{SKETCH} and its markers carry no summaries (an older version "
            f"wrote it): rebuild its report once with `fengshen-batch report {shown}`"
        )
    return Baseline(shown, manifest, merge(summaries))


def _change(today: float | None, baseline: float | None) -> dict:
    change = today / baseline - 1 if today is not None and baseline else None
    return {"today": today, "baseline": baseline, "change": change}


def ks_distance(a: dict, b: dict) -> dict:
    """The KS statistic of two log-histograms on the same bins, at the bins' upper edges (see the module)."""
    if not a["bins"] or not b["bins"]:
        return {"ks": None, "ks_at_ppl": None, "ks_bound": None}
    bins = np.array(sorted({int(k) for k in a["bins"]} | {int(k) for k in b["bins"]}), dtype=np.int64)
    mass = [np.array([h["bins"].get(str(k), 0) for k in bins], dtype=np.float64) for h in (a, b)]
    shares = [m / m.sum() for m in mass]
    gap = np.abs(np.cumsum(shares[0]) - np.cumsum(shares[1]))  # at each bin's upper edge
    i = int(np.argmax(gap))
    return {"ks": float(gap[i]), "ks_at_ppl": float(10 ** ((bins[i] + 1) / BINS_PER_DECADE)),
            "ks_bound": float(max(shares[0].max(), shares[1].max()))}  # fmt: skip


def _bucket_shares(hist: dict, cutoffs: list[float]) -> dict[str, float]:
    """Shares of a histogram's documents in head (<= c0), middle and tail (> c1), each bin at its middle."""
    values = np.array([bin_middle(hist, int(b)) for b in hist["bins"]], dtype=np.float64)
    counts = np.array(list(hist["bins"].values()), dtype=np.float64)
    total = counts.sum() or 1.0
    head = counts[values <= cutoffs[0]].sum()
    tail = counts[values > cutoffs[1]].sum()
    return {"head": head / total, "middle": (total - head - tail) / total, "tail": tail / total}


def _side_by_side(today: dict, baseline: dict) -> dict:
    t, b = figures(today), figures(baseline)
    return {
        "rows": {"today": t["rows"], "baseline": b["rows"]},
        # night-over-night volume: a feed that shrank (or doubled) is news even when its perplexity is not
        "rows_change": _change(t["rows"], b["rows"])["change"],
        "tokens": _change(t["tokens"], b["tokens"]),
        "corpus_ppl": _change(t["corpus_ppl"], b["corpus_ppl"]),
        "corpus_bits_per_byte": _change(t.get("corpus_bits_per_byte"), b.get("corpus_bits_per_byte")),
        **ks_distance(today["ppl"], baseline["ppl"]),
    }


def compare(today: dict, baseline: Baseline, by: str | None) -> dict:
    """Today's merged summary against the baseline's (see the module for each figure)."""
    t, b = figures(today), figures(baseline.sketch)
    out = {
        "baseline": baseline.url,
        **_side_by_side(today, baseline.sketch),
        "ppl_quantiles": {k: _change(t["ppl_quantiles"].get(k), v) for k, v in b["ppl_quantiles"].items()},
        "ks_method": f"Kolmogorov-Smirnov statistic of per-document perplexity at the log-histograms' bin edges "
        f"({BINS_PER_DECADE} per decade); the exact statistic is between ks and ks + ks_bound",
    }
    if by:
        if baseline.sketch.get("by") != by:
            out["groups_note"] = f"the baseline has no breakdown by {by}"
        else:
            mine, theirs = today["groups"], baseline.sketch["groups"]
            groups = [
                {"group": g, **_side_by_side(mine[g], theirs[g])} for g in sorted(mine.keys() & theirs.keys())
            ]
            groups.sort(key=lambda g: -max(abs(g["corpus_ppl"]["change"] or 0),
                                           abs(g["corpus_bits_per_byte"]["change"] or 0), g["ks"] or 0))  # fmt: skip
            out.update(by=by, groups=groups, new_groups=sorted(mine.keys() - theirs.keys()),
                       gone_groups=sorted(theirs.keys() - mine.keys()))  # fmt: skip
    cutoffs = baseline.manifest.get("bucket_cutoffs")
    column = baseline.manifest.get("spec", {}).get("bucket_by") or "ppl"
    if cutoffs and column in today and baseline.sketch.get("buckets"):
        counts = baseline.sketch["buckets"]
        total = sum(counts.values()) or 1
        out["baseline_buckets"] = {
            "column": column,
            "cutoffs": cutoffs,
            "baseline": {k: v / total for k, v in counts.items()},
            "today": _bucket_shares(today[column], cutoffs),
        }
    return out


def drift(comparison: dict, threshold: dict) -> dict:
    """Whether the comparison passed `threshold` (a DriftThreshold's fields), for the corpus or for a group
    with at least min_group_rows rows on both sides; each breach in words."""
    breaches = []

    def check(name: str, figures_: dict) -> None:
        change, ks = figures_["corpus_ppl"]["change"], figures_["ks"]
        if threshold.get("ppl_change") and change is not None and abs(change) > threshold["ppl_change"]:
            breaches.append(f"{name}: corpus perplexity {change:+.1%} (limit ±{threshold['ppl_change']:.1%})")
        bpb = figures_["corpus_bits_per_byte"]["change"]
        if threshold.get("bpb_change") and bpb is not None and abs(bpb) > threshold["bpb_change"]:
            breaches.append(f"{name}: bits per byte {bpb:+.1%} (limit ±{threshold['bpb_change']:.1%})")
        if threshold.get("ks") and ks is not None and ks > threshold["ks"]:
            breaches.append(f"{name}: KS distance {ks:.3f} (limit {threshold['ks']})")
        if limit := threshold.get("volume_change"):
            for what, change in (
                ("rows", figures_.get("rows_change")),
                ("tokens", figures_["tokens"]["change"]),
            ):
                if change is not None and abs(change) > limit:
                    breaches.append(f"{name}: {what} {change:+.1%} (limit ±{limit:.1%})")

    check("corpus", comparison)
    for group in comparison.get("groups", []):
        if min(group["rows"].values()) >= threshold.get("min_group_rows", 1):
            check(f"{comparison['by']} {group['group']}", group)
    return {"threshold": threshold, "exceeded": bool(breaches), "breaches": breaches}


def comparison_line(comparison: dict, verdict: dict | None) -> str:
    """The comparison in one line, for the terminal: `baseline s3://scores/2026-12-01: corpus ppl +1.2%, bits
    per byte +0.8%, KS 0.013, rows -3.0%, tokens -2.1%; within the drift threshold`."""

    def pct(v) -> str:
        return "n/a" if v is None else f"{v:+.1%}"

    ks = comparison.get("ks")
    parts = [
        f"corpus ppl {pct(comparison['corpus_ppl']['change'])}",
        f"bits per byte {pct(comparison['corpus_bits_per_byte']['change'])}",
        f"KS {'n/a' if ks is None else f'{ks:.3f}'}",
        f"rows {pct(comparison.get('rows_change'))}",
        f"tokens {pct(comparison['tokens']['change'])}",
    ]
    if verdict is None:
        end = "no drift threshold set"
    elif verdict["exceeded"]:
        end = "DRIFTED: " + "; ".join(verdict["breaches"])
    else:
        end = "within the drift threshold"
    return f"baseline {comparison['baseline']}: {', '.join(parts)}; {end}"


def comparison_html(summary: dict) -> str:
    """The report's comparison section: the drift verdict, today against the baseline, the groups (largest
    change first), groups new or gone, and today's documents in the baseline's buckets."""
    c, verdict = summary["comparison"], summary.get("drift")

    def num(v) -> str:
        return "–" if v is None else f"{v:,.4g}" if isinstance(v, float) else f"{v:,}"

    def pct(v) -> str:
        return "–" if v is None else f"{v:+.1%}"

    banner = ""
    if verdict:
        if verdict["exceeded"]:
            items = "".join(f"<li>{html.escape(b)}</li>" for b in verdict["breaches"])
            banner = f'<div style="background:#fde2e1;padding:.5em 1em"><b>Drift past the threshold</b><ul>{items}</ul></div>'
        else:
            banner = '<p style="background:#e3f4e1;padding:.5em 1em">No drift past the threshold.</p>'
    rows = [("documents", c["rows"]["today"], c["rows"]["baseline"], None),
            ("corpus perplexity", *c["corpus_ppl"].values()),
            ("corpus bits per byte", *c["corpus_bits_per_byte"].values())]  # fmt: skip
    rows += [
        (f"ppl {k}", *v.values())
        for k, v in c["ppl_quantiles"].items()
        if k in ("p05", "p25", "p50", "p75", "p95")
    ]
    body = "".join(
        f"<tr><th>{html.escape(name)}</th><td>{num(t)}</td><td>{num(b)}</td><td>{pct(ch)}</td></tr>"
        for name, t, b, ch in rows
    )
    ks = f"KS distance {num(c['ks'])} (at ppl {num(c['ks_at_ppl'])}; exact within +{num(c['ks_bound'])})"
    out = (f"<h2>Compared with the baseline</h2>{banner}<p>Baseline <code>{html.escape(c['baseline'])}</code>. "
           f"{html.escape(ks)}.</p><table><tr><th></th><th>today</th><th>baseline</th><th>change</th></tr>{body}</table>")  # fmt: skip
    if c.get("groups"):
        by = html.escape(c["by"])
        body = "".join(
            f"<tr><td>{html.escape(g['group'])}</td><td>{num(g['rows']['today'])}</td><td>{num(g['rows']['baseline'])}</td>"
            f"<td>{num(g['corpus_ppl']['today'])}</td><td>{num(g['corpus_ppl']['baseline'])}</td>"
            f"<td>{pct(g['corpus_ppl']['change'])}</td><td>{num(g['ks'])}</td></tr>"
            for g in c["groups"]
        )
        out += (f"<h3>By {by}, largest change first</h3><table><tr><th>{by}</th><th>documents</th><th>baseline</th>"
                f"<th>corpus ppl</th><th>baseline</th><th>change</th><th>KS</th></tr>{body}</table>")  # fmt: skip
    for key, words in (("new_groups", "Only today"), ("gone_groups", "Only in the baseline")):
        if c.get(key):
            out += f"<p>{words}: {html.escape(', '.join(c[key]))}</p>"
    if c.get("groups_note"):
        out += f"<p>{html.escape(c['groups_note'])}</p>"
    if b := c.get("baseline_buckets"):
        cells = "".join(
            f"<tr><th>{k}</th><td>{b['today'][k]:.1%}</td><td>{b['baseline'][k]:.1%}</td></tr>"
            for k in b["today"]
        )
        cuts = ", ".join(f"{x:,.4g}" for x in b["cutoffs"])
        out += (f"<h3>Today's documents in the baseline's buckets ({html.escape(b['column'])} cut at {cuts})</h3>"
                f"<table><tr><th></th><th>today</th><th>baseline</th></tr>{cells}</table>")  # fmt: skip
    return out
