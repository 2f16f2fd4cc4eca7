"""Mergeable histograms, the building block of every summary: log-scale (200 bins per decade), linear or one bin
per whole number; merged by adding bins, quantiles read as numpy computes them to within half a bin."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..io.outputs import sum_counts

BINS_PER_DECADE = 200


QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)


def histogram(values: np.ndarray, width: float | None = None, integer: bool = False) -> dict:
    """{"bins": {bin: count}, "min", "max"} of positive values (bin b holds [10^(b/B), 10^((b+1)/B))); with
    `width`, of any values on a linear scale (bin b holds [b * width, (b + 1) * width)), for signed figures;
    `integer`: of whole numbers, one bin per number (exact quantiles, e.g. of token counts)."""
    if integer:
        width = 1
    extra = {"width": width, **({"integer": True} if integer else {})} if width else {}
    if not len(values):
        return {"bins": {}, "min": None, "max": None, **extra}
    v = values.astype(np.float64)
    if width:
        raw = np.floor(v / width)
    else:
        v = np.maximum(v, 1e-300)
        raw = np.floor(np.log10(v) * BINS_PER_DECADE)
    bins, counts = np.unique(raw.astype(np.int64), return_counts=True)
    return {"bins": {str(b): int(c) for b, c in zip(bins, counts, strict=True)},
            "min": float(v.min()), "max": float(v.max()), **extra}  # fmt: skip


def merge_histograms(hists: list[dict]) -> dict:
    bins = sum_counts([h["bins"] for h in hists])
    lows = [h["min"] for h in hists if h["min"] is not None]
    highs = [h["max"] for h in hists if h["max"] is not None]
    extra = {k: hists[0][k] for k in ("width", "integer") if hists and k in hists[0]}
    return {"bins": bins, "min": min(lows, default=None), "max": max(highs, default=None), **extra}


def bin_middle(hist: dict, b: int) -> float:
    """A bin's middle: arithmetic on a linear histogram, geometric on a log one; a whole number's own bin
    is that number."""
    if hist.get("integer"):
        return float(b)
    if "width" in hist:
        return (b + 0.5) * hist["width"]
    return 10 ** ((b + 0.5) / BINS_PER_DECADE)


def quantile(hist: dict, q: float) -> float | None:
    """The q-quantile as numpy computes it (linear between the order statistics around rank q*(n-1)), each
    order statistic read as the middle of its bin: within half a bin (0.6% on the log scale, width / 2 on
    a linear one) of the exact one."""
    if not hist["bins"]:
        return None
    bins = np.array(sorted(int(b) for b in hist["bins"]), dtype=np.int64)
    cumulative = np.cumsum([hist["bins"][str(b)] for b in bins])
    rank = q * (cumulative[-1] - 1)

    def order_statistic(i: int) -> float:  # the i-th smallest value (0-based), to within its bin
        b = bins[int(np.searchsorted(cumulative, i, side="right"))]
        return float(min(max(bin_middle(hist, b), hist["min"]), hist["max"]))

    lo = math.floor(rank)
    low, high = order_statistic(lo), order_statistic(min(lo + 1, int(cumulative[-1]) - 1))
    return low + (rank - lo) * (high - low)


def quantiles(hist: dict) -> dict[str, float]:
    if not hist["bins"]:
        return {}
    return {f"p{round(q * 100):02d}": quantile(hist, q) for q in QUANTILES}


# A report breaks its figures down by at most this many `report_by` values: a column of ids or texts would
# otherwise make every shard's marker megabytes of per-group histograms (4,096 values: 1 MB) and the report a
# table nobody reads. Past it, the breakdown is left out and the report says so.
MAX_GROUPS = 256
# The group of rows whose `report_by` value is null: apart from any string a column holds (the string "null"
# is its own group), shown as `null_label`.
NULL_GROUP = "\x00null"


def group_keys(column: pa.ChunkedArray | pa.Array) -> tuple[list[str] | None, int]:
    """(each row's group key, the number of distinct values, nulls one of them); keys None past MAX_GROUPS."""
    distinct = len(
        pc.unique(column)
    )  # nulls one value (dictionary columns too, which count_distinct refuses)
    if distinct > MAX_GROUPS:
        return None, distinct
    return [NULL_GROUP if v is None else str(v) for v in column.to_pylist()], distinct


def group_label(key: str) -> str:
    """A group key as a report shows it."""
    return "(null)" if key == NULL_GROUP else key


def merge_groups(summaries: list[dict], merge_figures) -> dict:
    """{"by", "groups"} of summaries all made for one `by` column, each group's figures merged with
    `merge_figures` (a group found in some shards only is merged from those); {} otherwise. Past MAX_GROUPS
    values in any shard or all together, groups is empty and `groups_left_out` says how many were seen."""
    bys = {s.get("by") for s in summaries}
    if len(bys) != 1 or not (by := bys.pop()):
        return {}
    keys = sorted({k for s in summaries for k in s["groups"]})
    seen = max([len(keys), *(s.get("groups_left_out", 0) for s in summaries)])
    if seen > MAX_GROUPS:
        return {"by": by, "groups": {}, "groups_left_out": seen}
    groups = {k: merge_figures([s["groups"][k] for s in summaries if k in s["groups"]]) for k in keys}
    return {"by": by, "groups": groups}


def groups_note(summary: dict) -> str | None:
    """What a report says where its breakdown was left out."""
    if not summary.get("groups_left_out"):
        return None
    return (f"{summary['by']} has at least {summary['groups_left_out']} distinct values, more than the {MAX_GROUPS} "
            "a report breaks down: per-group figures are left out (report_by a column of fewer values)")  # fmt: skip
