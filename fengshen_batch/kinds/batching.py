"""Token-budget batching for scoring (and judging, which scores statements).

Items are sorted longest first (as lm-eval does: the first batch is the widest, so an out-of-memory error
shows at once) and packed so that rows x padded width stays within a token budget, not a row count: short
texts go many to a batch, long ones few. On CUDA out-of-memory the budget is halved and the same batch is
retried. Results go into slots by original index, and every slot must be filled exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)


def empty_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_packed(
    lengths: Sequence[int],
    token_budget: int,
    process: Callable[[list[int]], Sequence[object]],
) -> tuple[list[object], int]:
    """Call `process(indices)` on budget-packed batches; return (results in input order, final budget).

    `process` returns one result per index it was given, in that order. The returned budget is the one
    that last fit, so a long-lived caller (an actor) can keep using it.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    n = len(lengths)
    order = sorted(range(n), key=lambda i: -lengths[i])  # stable: equal lengths keep input order
    results: list[object] = [None] * n
    filled = [0] * n
    budget = token_budget
    pos = 0
    while pos < n:
        width = lengths[order[pos]]  # the widest item of the batch sets its padded width
        rows = max(1, min(budget // max(width, 1), n - pos))
        batch = order[pos : pos + rows]
        try:
            out = process(batch)
        except torch.OutOfMemoryError:
            if rows == 1:
                raise
            empty_cuda_cache()
            budget = max(width, budget // 2)
            log.warning("out of memory on %d x %d tokens: token budget halved to %d", rows, width, budget)
            continue
        if len(out) != len(batch):
            raise RuntimeError(f"batch of {len(batch)} items returned {len(out)} results")
        for i, r in zip(batch, out, strict=True):
            results[i] = r
            filled[i] += 1
        pos += rows
    bad = [i for i, c in enumerate(filled) if c != 1]
    if bad:
        raise RuntimeError(f"{len(bad)} items were not returned exactly once (first: {bad[:5]})")
    return results, budget
