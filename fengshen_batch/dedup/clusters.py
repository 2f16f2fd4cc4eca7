"""Clusters of near-duplicate samples from their confirmed pairs, and each cluster's survivor.

A sample is a node key: `run << 56 | shard << 32 | position`, where `position` is its row in its shard's data
file as the actor wrote it (input order, then sample index), and `run` is 0 for this job and i for its i-th
`against` output. The clusters are the connected components of the confirmed pairs (a chain a~b~c is one
cluster even where a and c are further apart: as in DataTrove's and NeMo Curator's fuzzy dedup), found by
min-label hooking with pointer jumping in numpy: memory is that of the duplicates, not of the corpus.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

RUN_SHIFT, SHARD_SHIFT = 56, 32
POSITION_MASK = (1 << SHARD_SHIFT) - 1
SHARD_MASK = (1 << (RUN_SHIFT - SHARD_SHIFT)) - 1


def node_key(run: int, shard: int, positions: np.ndarray) -> np.ndarray:
    return (np.int64(run) << RUN_SHIFT) | (np.int64(shard) << SHARD_SHIFT) | positions.astype(np.int64)


def shard_of(keys: np.ndarray) -> np.ndarray:
    return (keys >> SHARD_SHIFT) & SHARD_MASK


def run_of(keys: np.ndarray) -> np.ndarray:
    return keys >> RUN_SHIFT


def components(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, root of each): the sorted distinct node keys of the pairs (u[i], v[i]) and, for each, the
    smallest key of its connected component."""
    nodes = np.unique(np.concatenate([u, v]))
    ui, vi = np.searchsorted(nodes, u), np.searchsorted(nodes, v)
    parent = np.arange(len(nodes))
    while True:
        pu, pv = parent[ui], parent[vi]
        if np.array_equal(pu, pv):
            return nodes, nodes[parent]
        np.minimum.at(parent, np.maximum(pu, pv), np.minimum(pu, pv))  # hook the larger root on the smaller
        while True:  # pointer jumping until every node points at its root
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped


def survivors(
    nodes: np.ndarray, roots: np.ndarray, nll: np.ndarray, length: np.ndarray, keep: str
) -> np.ndarray:
    """(len(nodes),) bool: the one survivor per cluster among this run's samples; none in a cluster that
    holds an earlier output's sample (that one was there first). `nll`: NLL per token (NaN: unknown, ranked
    last); `length`: characters."""
    earlier = run_of(nodes) > 0
    has_earlier = np.zeros(len(nodes), bool)
    np.logical_or.at(has_earlier, np.searchsorted(nodes, roots[earlier]), True)
    blocked = has_earlier[np.searchsorted(nodes, roots)]
    if keep == "lowest_nll":
        rank = np.where(np.isnan(nll), np.inf, nll)
    elif keep == "longest":
        rank = -length.astype(np.float64)
    else:
        rank = np.zeros(len(nodes))
    # earlier samples sort last so a cluster's first candidate is this run's best; ties by key (input order)
    order = np.lexsort((nodes, rank, earlier, roots))
    first = np.ones(len(order), bool)
    first[1:] = roots[order][1:] != roots[order][:-1]
    out = np.zeros(len(nodes), bool)
    out[order[first]] = True
    return out & ~earlier & ~blocked


def cluster_table(u: np.ndarray, v: np.ndarray, members: pa.Table, keep: str) -> tuple[pa.Table, dict]:
    """This run's clustered samples (`key`, `shard`, `cluster`, `keep`) from the confirmed pairs, and the
    figures for the report. `members`: `key`, `nll`, `length` of every node the pairs name."""
    nodes, roots = components(u, v)
    by_key = members.sort_by("key")
    idx = np.searchsorted(by_key.column("key").to_numpy(), nodes)
    nll = by_key.column("nll").to_numpy(zero_copy_only=False).astype(np.float64)[idx]
    length = by_key.column("length").to_numpy(zero_copy_only=False)[idx]
    kept = survivors(nodes, roots, nll, length, keep)
    ours = run_of(nodes) == 0
    sizes = np.unique(roots, return_counts=True)[1]
    earlier_roots = np.unique(roots[~ours])
    table = pa.table(
        {"key": nodes[ours], "shard": shard_of(nodes[ours]), "cluster": roots[ours], "keep": kept[ours]}
    )
    figures = {
        "clustered_samples": int(ours.sum()),
        "clusters": int(len(np.unique(roots[ours]))),
        "removed": int((ours & ~kept).sum()),
        "matched_earlier": int((ours & np.isin(roots, earlier_roots)).sum()),
        "cluster_sizes": {str(s): int(c) for s, c in zip(*np.unique(sizes, return_counts=True), strict=True)},
    }
    return table, figures
