"""Near-duplicates in the output's files: each data file rewritten with `dup_cluster` and `dup_keep` (with
`dedup_output: drop`, the duplicates moved to `duplicates/`), the `against` outputs checked before a job
starts, and the report's section.

A data file is rewritten once: the rewrite of a shard writes `duplicates/part-N` (drop) before `data/part-N`,
each whole, and a data file that already has `dup_keep` is done. A run killed between the two rewrites
the pair on its rerun from the data file as the actor wrote it, so every sample is in exactly one folder.
"""

from __future__ import annotations

import html
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..errors import JobError
from ..io.outputs import DUPLICATES, SIGNATURES, OutputStore, part_name
from ..io.portable import write_portable
from ..io.redact import redact_url
from ..io.storage import StorageSpec, filesystem, join, write_whole

DUP_FIELDS = [pa.field("dup_cluster", pa.int64()), pa.field("dup_keep", pa.bool_())]


def mark_file(output_url: str, storage: StorageSpec, path: str, clusters: pa.Table, drop: bool, prefix: str):
    """Rewrite one shard's data file with its samples' clusters (null, and kept, when unique); returns
    (samples kept, samples removed)."""
    fs, root = filesystem(output_url, storage)
    cluster_name, keep_name = prefix + "dup_cluster", prefix + "dup_keep"
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    shard = int(path.rsplit("/", 1)[-1][5:11])
    if keep_name in table.column_names:  # rewritten by an earlier attempt
        if not drop:
            kept = int(pc.sum(table.column(keep_name)).as_py() or 0)
            return kept, len(table) - kept
        return len(table), _rows(fs, join(root, DUPLICATES, f"{part_name(shard)}.parquet"))
    mine = clusters.filter(pc.equal(clusters.column("shard"), shard))
    positions = (mine.column("key").to_numpy() & ((1 << 32) - 1)).astype(np.int64)
    cluster = np.full(len(table), -1, np.int64)
    keep = np.ones(len(table), bool)
    cluster[positions] = mine.column("cluster").to_numpy()
    keep[positions] = mine.column("keep").to_numpy(zero_copy_only=False)
    table = table.append_column(DUP_FIELDS[0].with_name(cluster_name), pa.array(cluster, mask=cluster < 0))
    table = table.append_column(DUP_FIELDS[1].with_name(keep_name), pa.array(keep))
    if not drop:
        write_whole(fs, path, lambda f: write_portable(table, f))
        return int(keep.sum()), int((~keep).sum())
    gone = table.filter(pa.array(~keep))
    fs.makedirs(join(root, DUPLICATES), exist_ok=True)
    write_whole(fs, join(root, DUPLICATES, f"{part_name(shard)}.parquet"), lambda f: write_portable(gone, f))
    kept = table.filter(pa.array(keep))
    write_whole(fs, path, lambda f: write_portable(kept, f))
    return len(kept), len(gone)


def _rows(fs, path: str) -> int:
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata.num_rows


def mark_files(output_url: str, storage: StorageSpec, paths: list[str], clusters: pa.Table, drop: bool,
               prefix: str) -> dict[str, int]:  # fmt: skip
    """`mark_file` on each of `paths` (4 at a time); samples kept and removed."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        done = list(pool.map(lambda p: mark_file(output_url, storage, p, clusters, drop, prefix), paths))
    return {"kept": sum(k for k, _ in done), "removed": sum(r for _, r in done)}


def against_outputs(spec) -> list[tuple[str, list[str]]]:
    """(url, signature files) of each `against` output, checked before Ray starts: a finished output of a
    job with `dedup:` whose signatures were made the same way (shingles, MinHash, its settings) as this job's."""
    d, out = spec.dedup, []
    for url in d.against:
        store = OutputStore(url, spec.storage)
        try:
            manifest = store.published_manifest()
        except JobError:
            manifest = None
        if manifest is None:
            raise JobError(f"dedup.against: {redact_url(url)} is not a finished fengshen-batch output")
        theirs = (manifest.get("dedup") or {}).get("signatures")
        if not theirs:
            raise JobError(
                f"dedup.against: {redact_url(url)} was written without dedup: it has no signatures"
            )
        want = d.signature_settings()
        got = {k: theirs.get(k) for k in want}
        if got != want:
            raise JobError(
                f"dedup.against: {redact_url(url)} made its signatures with {json.dumps(got)}, this job with "
                f"{json.dumps(want)}: they do not compare (use its settings, or leave it out)"
            )
        out.append((store.url, store.files(SIGNATURES)))
    return out


def dedup_section(figures: dict | None, rows: int) -> str:
    """The report's near-duplicate section: the rate, the cluster-size histogram, the largest clusters."""
    if not figures:
        return ""
    esc = html.escape
    rate = figures["removed"] / max(1, rows)
    sizes = sorted(figures["cluster_sizes"].items(), key=lambda kv: int(kv[0]))
    peak = max([c for _, c in sizes] or [1])
    bars = "".join(
        f"<tr><td>{esc(s)}</td><td><div style='width:{max(1, round(240 * c / peak))}px;height:14px;"
        f"background:#3b6ea5'></div></td><td>{c:,}</td></tr>"
        for s, c in sizes
    )
    clusters = "".join(
        f"<li><b>{e['size']} samples</b>{'' if e['kept'] else ' (all repeat an earlier output)'}<ol>"
        + "".join(f"<li>{esc(t)}</li>" for t in e["texts"])
        + "</ol></li>"
        for e in figures.get("examples", [])
    )
    against = (
        f"<p>{figures['matched_earlier']:,} samples repeat a sample of an earlier output.</p>"
        if figures.get("matched_earlier")
        else ""
    )
    return (
        "<section id='near-duplicates'><h2>Near-duplicates</h2>"
        f"<p><b>{rate:.1%}</b> of {rows:,} samples are near-duplicates of another ({figures['removed']:,} "
        f"not kept), in {figures['clusters']:,} clusters of {figures['clustered_samples']:,} samples; "
        f"{figures['confirmed_pairs']:,} of {figures['candidate_pairs']:,} candidate pairs confirmed at "
        f"Jaccard &ge; {figures['threshold']}.</p>{against}"
        f"<h3>Cluster sizes</h3><table class='hist'><tr><th>samples</th><th></th><th>clusters</th></tr>{bars}"
        f"</table><h3>Largest clusters</h3><ul class='clusters'>{clusters}</ul></section>"
    )
