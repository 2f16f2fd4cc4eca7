"""Near-duplicate clusters of a whole output, as Ray tasks over its signature files (written by the actors
that generated or scored each shard), never on the driver, which only passes object references along.

    signatures/ of this run and of each `against` output
      -> band tasks    (a slice of files each): every sample's LSH band keys, hash-partitioned P ways by
                       bucket, and its signature, nll and length, hash-partitioned J ways by key
      -> bucket tasks  (one per band partition): samples sharing a band key become candidate pairs, split
                       J ways by the pair's first key
      -> join-u tasks  (one per key partition): the partition's distinct pairs, each with its first sample's
                       signature, split J ways by the second key
      -> join-v tasks  (one per key partition): the second sample's signature beside it: pairs confirmed by
                       their estimated Jaccard; the confirmed edges and their samples' (key, nll, length)
      -> cluster task  : connected components over the confirmed edges, survivors, the report's figures
      -> preview task  : the text previews of the report's example clusters (a few files)
      -> rewrite tasks (map_files): each data file rewritten with dup_cluster/dup_keep (drop: duplicates/)

P and J grow with the corpus, so every task but the cluster task holds a bounded share of it whatever its
size: band and bucket tasks a fixed number of files' or band keys' rows, join tasks 1/J of the signatures
and of the candidate pairs. The cluster task, like DataTrove's, holds only the confirmed edges and their
samples' keys (about 40 bytes per duplicate: 2M samples of which half are copies fit in 40 MB).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from ..dedup.clusters import RUN_SHIFT, cluster_table, run_of, shard_of
from ..dedup.minhash import band_keys, estimated_jaccard, sig_array
from .partitions import read_columns, remote, returns, split

FILES_PER_TASK = 16  # signature files read by one band task (4096 rows each at the default)
BAND_ROWS_PER_PARTITION = 4_000_000  # band keys (16 bytes each) in one bucket task: 64 MB
JOIN_BYTES_PER_PARTITION = 64 * 2**20  # signatures (+ key, nll, length) held by one join task
CONFIRM_CHUNK = 65536  # pairs whose signatures are compared at once: 2 x 65536 x 128 x 4 bytes = 64 MB
MEMBER_COLUMNS = ["key", "sig", "nll", "length"]


def _tagged_keys(table: pa.Table, run: int) -> np.ndarray:
    """The file's node keys with its output's run number (an earlier output's files say run 0)."""
    return table.column("key").to_numpy() | np.int64(run << RUN_SHIFT)


def _part(keys: np.ndarray, n: int) -> np.ndarray:
    """Each node key's partition of n (a multiplicative hash: keys of one shard are consecutive)."""
    mixed = (keys.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)
    return (mixed % np.uint64(n)).astype(np.int64)


def band_task(url, storage, paths, run, bands, num_perm, partitions, joins):
    """(partitions,) tables of (`bucket`, `key`): every sample's band keys, partition = bucket mod P; then
    (joins,) tables of its members' columns (`key` tagged with the run, `sig`, `nll`, `length`) by key."""
    tables = [read_columns(url, storage, p, MEMBER_COLUMNS) for p in paths]
    table = pa.concat_tables(tables) if tables else None
    if table is None:
        table = pa.table({"key": pa.array([], pa.int64()), "sig": pa.array([], pa.binary(num_perm * 4)),
                          "nll": pa.array([], pa.float64()), "length": pa.array([], pa.int32())})  # fmt: skip
    keys = _tagged_keys(table, run)
    table = table.set_column(0, "key", pa.array(keys))
    buckets = band_keys(sig_array(table.column("sig"), num_perm), bands)  # (N, bands)
    banded = pa.table({"bucket": buckets.reshape(-1), "key": np.repeat(keys, bands)})
    by_bucket = split(
        banded, (buckets.reshape(-1).view(np.uint64) % np.uint64(partitions)).astype(np.int64), partitions
    )
    return [*by_bucket, *split(table, _part(keys, joins), joins)]


def bucket_task(joins, *parts: pa.Table):
    """(joins,) tables of candidate pairs (`u` < `v`) of one band partition, by u's key partition: each
    bucket's smallest key paired with every other member (a star: a bucket of m samples gives m - 1
    pairs, not m^2, and the same components)."""
    table = pa.concat_tables(parts)
    bucket, key = table.column("bucket").to_numpy(), table.column("key").to_numpy()
    order = np.lexsort((key, bucket))
    bucket, key = bucket[order], key[order]
    first = np.ones(len(bucket), bool)
    first[1:] = bucket[1:] != bucket[:-1]
    head = key[np.maximum.accumulate(np.where(first, np.arange(len(key)), 0))]  # each row's bucket's min
    pairs = np.unique(np.stack([head[~first], key[~first]], axis=1), axis=0).reshape(-1, 2)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]  # a sample twice in one bucket (a run given twice)
    return returns(split(pa.table({"u": pairs[:, 0], "v": pairs[:, 1]}), _part(pairs[:, 0], joins), joins))


def join_u_task(joins, n_members, *tables: pa.Table):
    """(joins,) tables of this key partition's distinct candidate pairs (a pair shares up to `bands`
    buckets: its copies all come here, for its u is here) with u's `sig`, `nll`, `length`, by v's key
    partition. `tables`: the partition's members (n_members tables, one per band task), then its pairs."""
    members, pair_parts = pa.concat_tables(tables[:n_members]), tables[n_members:]
    tables = [t for t in pair_parts if len(t)]
    if tables:
        table = pa.concat_tables(tables)
        uv = np.unique(np.stack([table.column("u").to_numpy(), table.column("v").to_numpy()], axis=1), axis=0)
    else:
        uv = np.zeros((0, 2), np.int64)
    members = members.sort_by("key")
    at = np.searchsorted(members.column("key").to_numpy(), uv[:, 0])  # every u is here
    out = pa.table({"u": uv[:, 0], "v": uv[:, 1], "sig_u": members.column("sig").take(at),
                    "nll_u": members.column("nll").take(at), "length_u": members.column("length").take(at)})  # fmt: skip
    return returns(split(out, _part(uv[:, 1], joins), joins))


def join_v_task(threshold, num_perm, n_members, *tables: pa.Table):
    """(confirmed edges `u`, `v`; their samples' `key`, `nll`, `length`; the candidate pairs seen) of
    this key partition: each pair's v signature beside its u's, kept at estimated Jaccard >= threshold.
    `tables`: the partition's members (n_members tables), then its pairs with u's columns."""
    members = pa.concat_tables(tables[:n_members]).sort_by("key")
    table = pa.concat_tables(tables[n_members:])
    u, v = table.column("u").to_numpy(), table.column("v").to_numpy()
    at = np.searchsorted(members.column("key").to_numpy(), v)  # every v is here
    sigs = sig_array(members.column("sig"), num_perm)
    ok = np.zeros(len(u), bool)
    for lo in range(0, len(u), CONFIRM_CHUNK):  # two (chunk, num_perm) arrays at a time, not the whole
        sl = slice(lo, lo + CONFIRM_CHUNK)
        a = sig_array(table.column("sig_u").slice(lo, CONFIRM_CHUNK), num_perm)
        ok[sl] = estimated_jaccard(a, sigs[at[sl]]) >= threshold
    hit = pa.array(ok)
    ends = pa.concat_tables([
        pa.table({"key": table.column("u"), "nll": table.column("nll_u"), "length": table.column("length_u")}).filter(hit),
        members.select(["key", "nll", "length"]).take(at[ok]),
    ])  # fmt: skip
    first = np.unique(ends.column("key").to_numpy(), return_index=True)[1]
    return pa.table({"u": u[ok], "v": v[ok]}), ends.take(first), int(len(u))


def cluster_task(keep, examples, n, *tables):
    """Confirmed edges -> (this run's clustered samples: key, shard, cluster, keep; the report's figures,
    their example clusters naming member keys, survivor first). `tables`: n edge tables, n node tables."""
    edges = pa.concat_tables(tables[:n])
    nodes = pa.concat_tables(tables[n:])
    u, v = edges.column("u").to_numpy(), edges.column("v").to_numpy()
    if not len(u):
        empty = pa.table({"key": pa.array([], pa.int64()), "shard": pa.array([], pa.int64()),
                          "cluster": pa.array([], pa.int64()), "keep": pa.array([], pa.bool_())})  # fmt: skip
        return empty, {"confirmed_pairs": 0, "clustered_samples": 0, "clusters": 0, "removed": 0,
                       "matched_earlier": 0, "cluster_sizes": {}, "examples": []}  # fmt: skip
    first = np.unique(nodes.column("key").to_numpy(), return_index=True)[1]  # a sample in several partitions
    table, figures = cluster_table(u, v, nodes.take(first), keep)
    figures = {"confirmed_pairs": int(len(u)), **figures, "examples": _examples(table, examples)}
    return table, figures


def _examples(table: pa.Table, limit: int) -> list[dict]:
    """The largest clusters, up to 4 member keys each (survivor first), for the report."""
    if not len(table) or not limit:
        return []
    cluster = table.column("cluster").to_numpy()
    ids, counts = np.unique(cluster, return_counts=True)
    top = ids[np.lexsort((ids, -counts))][:limit]
    out = []
    for c in top:
        rows = table.filter(pc.equal(table.column("cluster"), c))
        order = sorted(
            zip(rows.column("keep").to_pylist(), rows.column("key").to_pylist(), strict=True),
            key=lambda r: (not r[0], r[1]),
        )
        out.append({"cluster": int(c), "size": int(len(rows)), "kept": any(k for k, _ in order),
                    "keys": [k for _, k in order[:4]]})  # fmt: skip
    return out


def preview_task(storage, files: list[tuple[int, str, str]], keys: list[int]) -> dict[int, str]:
    """{key: text preview} of `keys`, from `files` ((run, output url, signature file path) holding them)."""
    out = {}
    for run, url, path in files:
        table = read_columns(url, storage, path, ["key", "preview"])
        tagged = _tagged_keys(table, run).tolist()
        out.update(zip(tagged, table.column("preview").to_pylist(), strict=True))
    return {k: out.get(k, "") for k in keys}


def near_duplicates(
    spec, outputs: list[tuple[str, list[str]]], examples: int = 5, options: dict | None = None
):
    """(ObjectRef of this run's cluster table, the report's figures) over `outputs`: (url, signature file
    paths) of this run (first) and of each `against` output, in order. `options`: Ray's task options for
    every task (the benchmark's max_calls=1, to see each task's memory in a process of its own)."""
    d, options = spec.dedup, options or {}
    samples = sum(len(paths) for _, paths in outputs) * spec.shard_rows
    partitions = max(1, min(256, -(-samples * d.bands // BAND_ROWS_PER_PARTITION)))
    joins = max(1, min(256, -(-samples * (4 * d.num_perm + 20) // JOIN_BYTES_PER_PARTITION)))
    band = remote(band_task, options, num_returns=partitions + joins)
    slices = [(run, url, paths[i : i + FILES_PER_TASK])
              for run, (url, paths) in enumerate(outputs) for i in range(0, len(paths), FILES_PER_TASK)]  # fmt: skip
    parts = [band.remote(url, spec.storage, chunk, run, d.bands, d.num_perm, partitions, joins)
             for run, url, chunk in slices]  # fmt: skip
    bucket = remote(bucket_task, options, num_returns=joins)
    pairs = [bucket.remote(joins, *(p[i] for p in parts)) for i in range(partitions)]
    pairs = [p if joins > 1 else [p] for p in pairs]
    join_u = remote(join_u_task, options, num_returns=joins)
    with_u = [join_u.remote(joins, len(parts), *(p[partitions + q] for p in parts), *(t[q] for t in pairs))
              for q in range(joins)]  # fmt: skip
    with_u = [w if joins > 1 else [w] for w in with_u]
    join_v = remote(join_v_task, options, num_returns=3)
    confirmed = [join_v.remote(d.threshold, d.num_perm, len(parts), *(p[partitions + q] for p in parts), *(w[q] for w in with_u))
                 for q in range(joins)]  # fmt: skip
    task = remote(cluster_task, options, num_returns=2)
    table, figures = task.remote(
        d.keep, examples, joins, *(c[0] for c in confirmed), *(c[1] for c in confirmed)
    )
    figures = ray.get(figures)
    figures = {"candidate_pairs": int(sum(ray.get([c[2] for c in confirmed]))), **figures}
    figures["examples"] = _previews(spec, outputs, figures["examples"], options)
    return table, figures


def _previews(spec, outputs, clusters: list[dict], options: dict) -> list[dict]:
    """The example clusters with their members' previews (`texts`) in place of their keys, read by one
    task from the few signature files that hold them."""
    keys = [k for c in clusters for k in c["keys"]]
    if not keys:
        return [{k: v for k, v in c.items() if k != "keys"} | {"texts": []} for c in clusters]
    by_shard = [{int(os.path.basename(p)[5:11]): p for p in paths} for _, paths in outputs]
    where = {
        (int(run), int(shard))
        for run, shard in zip(run_of(np.array(keys)), shard_of(np.array(keys)), strict=True)
    }
    files = [(run, outputs[run][0], by_shard[run][shard]) for run, shard in sorted(where)]
    texts = ray.get(remote(preview_task, options).remote(spec.storage, files, keys))
    return [
        {k: v for k, v in c.items() if k != "keys"} | {"texts": [texts[k] for k in c["keys"]]}
        for c in clusters
    ]


__all__ = ["near_duplicates", "shard_of"]
