"""The job's near-duplicate step, after every shard is committed and before the kind's report: clusters over
the signature files (Ray tasks, `workers/dedup.py`), then each data file marked (or split, with
`dedup_output: drop`) where it lies. Its figures go to the manifest's `dedup` and the report's section."""

from __future__ import annotations

import time

from ..errors import JobError
from ..io.outputs import DATA, SIGNATURES, OutputStore, sum_counts
from ..io.redact import redact_url
from ..reports.duplicates import against_outputs, mark_files


def check_dedup(spec) -> dict:
    """Before Ray starts: the `against` outputs finished, comparable, and not this job's own output."""
    if getattr(spec, "dedup", None) is None:
        return {}
    own = OutputStore(spec.output, spec.storage).url
    if any(OutputStore(u, spec.storage).url == own for u in spec.dedup.against):
        raise JobError(f"dedup.against names this job's own output {redact_url(own)}: give earlier outputs")
    return {"dedup_against": against_outputs(spec)}


def dedup_output(spec, store: OutputStore, context: dict, progress) -> dict:
    """Cluster, mark and (drop) move the output's near-duplicates; the manifest's `dedup` figures."""
    t = time.time()
    outputs = [(store.url, store.files(SIGNATURES)), *context.get("dedup_against", [])]
    clusters, figures = context["near_duplicates"](spec, outputs)
    cluster_seconds = time.time() - t
    parts = context["map_files"](
        mark_files, store.files(DATA), output_url=store.url, storage=spec.storage, clusters=clusters,
        drop=spec.dedup_output == "drop", prefix=spec.result_prefix,
    )  # fmt: skip
    counts = sum_counts(parts)
    if counts.get("removed", 0) != figures["removed"]:  # every sample the clusters dropped, marked once
        raise RuntimeError(f"dedup: {counts.get('removed', 0)} samples marked, {figures['removed']} expected")
    progress(
        f"near-duplicates: {figures['removed']:,} of {counts['kept'] + counts['removed']:,} samples "
        f"({figures['clusters']:,} clusters){' moved to duplicates/' if spec.dedup_output == 'drop' else ''}"
    )
    return {
        **figures,
        "threshold": spec.dedup.threshold,
        "signatures": spec.dedup.signature_settings(),  # what a later job's `against` is checked by
        "output": spec.dedup_output,
        "kept": counts["kept"],
        "against": [redact_url(u) for u in spec.dedup.against],
        "seconds": {
            "clusters": round(cluster_seconds, 3),
            "mark": round(time.time() - t - cluster_seconds, 3),
        },
    }
