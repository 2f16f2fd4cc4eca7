"""Mergeable per-shard summaries: merging shards' summaries equals summarising all rows at once, the
quantiles are within half a log-bin of numpy's, the sums and the extreme documents are exact."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from fengshen_batch.reports.histograms import NULL_GROUP
from fengshen_batch.reports.score_sketch import EXAMPLES, figures, merge, summarize


def _rows(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 500, n)
    nll = tokens * rng.lognormal(1.0, 0.6, n)
    ppl = np.exp(nll / tokens)
    source = rng.choice(["web", "books", None], n).tolist()
    return pa.table({
        "id": [f"d{i}" for i in range(n)], "text": [f"text {i}" for i in range(n)], "nll_sum": nll,
        "token_count": tokens, "ppl": ppl, "bits_per_byte": nll / (tokens * 4 * math.log(2)), "source": source,
    })  # fmt: skip


@pytest.mark.parametrize("n", [1, 2, 35, 20_000])
def test_merged_shard_summaries_equal_the_whole(n):
    table = _rows(n)
    cuts = sorted({0, n // 3, n // 2, n})
    shards = [
        summarize(table.slice(a, b - a), "text", "source") for a, b in zip(cuts, cuts[1:], strict=False)
    ]
    merged, whole = merge(shards), summarize(table, "text", "source")
    got, want = figures(merged), figures(whole)
    assert got["rows"] == n and got["tokens"] == want["tokens"] == int(np.sum(table["token_count"]))
    assert got["corpus_ppl"] == pytest.approx(
        math.exp(np.sum(table["nll_sum"]) / np.sum(table["token_count"]))
    )
    ppl = table.column("ppl").to_numpy()
    for q, key in ((0.01, "p01"), (0.5, "p50"), (0.99, "p99")):
        assert got["ppl_quantiles"][key] == want["ppl_quantiles"][key]  # the same bins, merged or not
        assert got["ppl_quantiles"][key] == pytest.approx(np.quantile(ppl, q), rel=6e-3)
    order = np.argsort(ppl, kind="stable")
    assert [r["id"] for r in merged["low"]] == [f"d{i}" for i in order[:EXAMPLES]]
    assert [r["id"] for r in merged["high"]][:1] == [f"d{order[-1]}"]
    groups = {NULL_GROUP if s is None else s for s in table.column("source").to_pylist()}
    assert set(merged["groups"]) == groups and sum(g["rows"] for g in merged["groups"].values()) == n
