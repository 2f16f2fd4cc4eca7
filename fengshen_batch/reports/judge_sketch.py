"""Mergeable summaries of judged rows: a judge job's accuracy and report without a pass over its output.

As for scoring and generation, the actor that writes a shard summarises it (`summarize`), the summary rides
in the shard's marker, and the driver merges them (`merge`). A summary holds:
- exact counts: rows judged, labelled rows, correct choices per criterion (ppl, nll, bpb), labels that name
  no candidate (`invalid`), and the same per value of the job's `report_by` column;
- a log-histogram of the winning margin (the gap between the best two candidates under the job's
  criterion): how sure the judgments are;
- the WORST labelled rows chosen wrong with the largest margins (confidently wrong: what a reader checks
  first), exact after merging since each shard keeps its own.
"""

from __future__ import annotations

from ..io.outputs import sum_counts
from .histograms import group_keys, histogram, merge_groups, merge_histograms, quantiles

WORST = 10
STATEMENT_CHARS = 200


def count_outcomes(outcomes: list[dict]) -> dict:
    """rows, labelled, invalid and correct per criterion of a list of per-row outcomes."""
    labelled = [o for o in outcomes if o["target"] is not None]
    criteria = outcomes[0]["choices"] if outcomes else ()
    return {
        "rows": len(outcomes),
        "labelled": len(labelled),
        "invalid": sum(o["invalid"] for o in outcomes),
        # per criterion (kinds.judging.CRITERIA: each outcome's `choices` names them)
        "correct": {name: sum(o["choices"][name] == o["target"] for o in labelled) for name in criteria},
    }


def summarize(outcomes: list[dict], groups: list[str] | None, n_groups: int, by: str | None) -> dict:
    """One shard's summary from its rows' outcomes (`kinds.judge.outcomes`): each a dict of id, statements,
    target (the label's candidate index or None), invalid, choices per criterion, choice and margin under the
    job's criterion. `groups`: each row's `by` value (None past MAX_GROUPS: `n_groups` distinct)."""
    import numpy as np

    margins = np.array([o["margin"] for o in outcomes if o["margin"] is not None], dtype=np.float64)
    wrong = [o for o in outcomes if o["target"] is not None and o["choice"] != o["target"]]
    wrong.sort(key=lambda o: (-(o["margin"] or 0.0), str(o["id"])))
    summary = {
        **count_outcomes(outcomes),
        "margin": histogram(np.maximum(margins, 1e-9)),
        "worst": [_example(o) for o in wrong[:WORST]],
    }
    if by:
        summary["by"] = by
        if groups is None:
            summary["groups"], summary["groups_left_out"] = {}, n_groups
        else:
            keys = sorted(set(groups))
            summary["groups"] = {
                k: count_outcomes([o for o, g in zip(outcomes, groups, strict=True) if g == k]) for k in keys
            }
    return summary


def _example(o: dict) -> dict:
    return {"id": o["id"], "choice": o["choice"], "target": o["target"], "margin": o["margin"],
            "chosen": o["statements"][o["choice"]][:STATEMENT_CHARS],
            "labelled": o["statements"][o["target"]][:STATEMENT_CHARS]}  # fmt: skip


def _merge_counts(parts: list[dict]) -> dict:
    return sum_counts([{k: p[k] for k in ("rows", "labelled", "invalid", "correct")} for p in parts])


def merge(summaries: list[dict]) -> dict:
    """One summary of many shards' (any order)."""
    merged = _merge_counts(summaries)
    merged["margin"] = merge_histograms([s["margin"] for s in summaries])
    worst = sorted(
        (w for s in summaries for w in s["worst"]), key=lambda w: (-(w["margin"] or 0.0), str(w["id"]))
    )
    merged["worst"] = worst[:WORST]
    merged.update(merge_groups(summaries, _merge_counts))
    return merged


def accuracy(counts: dict, criterion: str) -> dict:
    """Accuracy of the choices against labels, for the job's criterion and for each criterion."""
    labelled = counts["labelled"]
    per = {name: (n / labelled if labelled else None) for name, n in counts["correct"].items()}
    return {
        "criterion": criterion,
        "accuracy": per[criterion],
        "per_criterion": per,
        "labelled_rows": labelled,
        # labels that name no candidate (out of range, a fraction, a text matching none): not counted above
        "invalid_label_rows": counts.get("invalid", 0),
    }


def figures(summary: dict, criterion: str) -> dict:
    """What the report shows of a merged summary."""
    out = {
        "rows": summary["rows"],
        **accuracy(summary, criterion),
        "margin_quantiles": quantiles(summary["margin"]),
    }
    if summary.get("by"):
        out["by"] = summary["by"]
        out["groups"] = {
            g: accuracy(c, criterion) | {"rows": c["rows"]} for g, c in summary["groups"].items()
        }
        if summary.get("groups_left_out"):
            out["groups_left_out"] = summary["groups_left_out"]
    return out


def group_values(column, by: str | None):
    """(each row's group key or None past MAX_GROUPS, distinct count) of the `by` column, or (None, 0)."""
    if not by:
        return None, 0
    return group_keys(column)
