"""A score job's `reuse:` outputs, checked before Ray starts or any model loads: each is a finished score
job's output whose results are tonight's for the same text (same model, config, tokenizer, stride, dtype,
reference model, token columns and content keys), or it is refused, naming what differs; with
`reuse_mismatch: skip` it is left out instead, and said so. The lookup itself runs on Ray
(`workers/reuse.py`, handed to `Score.before_shards` by the driver), once the shards to do are known."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import JobError
from ..io.outputs import DATA, DUPLICATES, OutputStore
from ..io.redact import redact_url
from ..reports.baseline import differences
from . import get


@dataclass(frozen=True)
class ReuseSource:
    """An earlier output that results are taken from: where its rows are and what its columns are named."""

    url: str
    shown: str  # redacted: written into the manifest
    names: dict[str, str]  # today's result name -> the column it has there (its result_prefix)
    paths: list[str]  # its data files (and duplicates/, rows a dedup job moved aside)
    rows: int
    token_bytes_per_row: int = 0  # token_ids and token_logprobs, on average: the lookup's partition sizes
    on_gpu: bool | None = None  # where it was scored (its manifest's gpus_per_actor; None: not recorded)


def reuse_differences(manifest: dict, record: dict, fingerprint: dict) -> list[str]:
    """What makes an earlier output's results not tonight's for the same text (the baseline's differences,
    and the settings that change a row's result columns)."""
    out = differences(manifest, record, fingerprint)
    theirs = manifest.get("spec") or {}
    if theirs.get("content_key") != record.get("content_key"):
        have = theirs.get("content_key")
        out.append(f"content key {have} (today {record.get('content_key')})" if have else
                   "content key (it has none: a version before content keys wrote it)")  # fmt: skip
    if theirs.get("dtype") != record.get("dtype"):
        out.append(f"dtype {theirs.get('dtype')} (today {record.get('dtype')})")
    if record.get("reference_model") and theirs.get("reference_model") != record.get("reference_model"):
        out.append(f"reference model {theirs.get('reference_model')} (today {record.get('reference_model')})")
    if record.get("token_logprobs") and not theirs.get("token_logprobs"):
        out.append("token columns (it has no token_logprobs, asked for today)")
    return out


def _source(spec, url: str, record: dict, fingerprint: dict) -> ReuseSource | str:
    """The output at `url` as a ReuseSource, or the one line that says why it cannot be one."""
    shown = redact_url(url)
    store = OutputStore(url, spec.storage)
    try:
        manifest = store.published_manifest()
    except JobError:
        raise
    except Exception as e:
        raise JobError(f"cannot read the reuse output {shown}: {type(e).__name__}: {e}") from None
    if manifest is None:
        return f"reuse output {shown} has no _SUCCESS: it is not a finished job's output"
    kind = (manifest.get("spec") or {}).get("kind", "score")
    if kind != "score":
        return f"reuse output {shown} is the output of a {kind} job; reuse takes score jobs' outputs"
    if differs := reuse_differences(manifest, record, fingerprint):
        return f"reuse output {shown} was scored with another {'; '.join(differs)}: its results are not tonight's"
    prefix = manifest["spec"].get("result_prefix", "")
    names = {f.name: prefix + f.name for f in get("score").result_fields(spec)}
    paths = store.files(DATA) + store.files(DUPLICATES)
    if paths:  # one footer: a column renamed or dropped after the job wrote it
        with store.fs.open(paths[0], "rb") as f:
            have = set(pq.read_schema(f).names)
        if missing := [c for c in names.values() if c not in have]:
            return f"reuse output {shown} has no column {missing[0]!r} in {redact_url(paths[0])}"
    counts = manifest.get("counts") or {}
    rows = int(counts.get("result_rows", 0))
    per_row = 8 * counts.get("tokens", 0) // max(rows, 1) if record.get("token_logprobs") else 0
    gpus = manifest.get("gpus_per_actor")
    return ReuseSource(url, shown, names, paths, rows, per_row, None if gpus is None else gpus > 0)


def _refuse_or_skip(spec, line: str, skipped: list[str], progress) -> None:
    if spec.reuse_mismatch == "fail":
        raise JobError(f"{line}; leave it out of reuse, or set reuse_mismatch: skip (--reuse-mismatch skip)")
    progress(f"{line}; left out (reuse_mismatch: skip)")
    skipped.append(line)


def check_reuse(spec, record: dict, fingerprint: dict, progress) -> tuple[list[ReuseSource], list[str]]:
    """The usable `reuse` outputs, in order, and the lines of those left out (`reuse_mismatch: skip`); a
    JobError names the first unusable one otherwise."""
    sources, skipped = [], []
    for url in spec.reuse:
        found = _source(spec, url, record, fingerprint)
        if isinstance(found, ReuseSource):
            sources.append(found)
        else:
            _refuse_or_skip(spec, found, skipped, progress)
    return sources, skipped


def check_devices(spec, sources: list[ReuseSource], gpus: float, progress) -> tuple[list, list[str]]:
    """With `dtype: auto` the precision follows the device (float32 on CPUs, bfloat16 or float16 on GPUs):
    an output scored on the other kind is refused (or left out) once tonight's device is known, after Ray
    starts and before any model loads. Returns the sources kept and the lines of those left out."""
    if spec.dtype != "auto":  # the same dtype on either device, checked with the rest
        return sources, []
    keep, skipped = [], []
    for s in sources:
        if s.on_gpu is None or s.on_gpu == (gpus > 0):
            keep.append(s)
            continue
        there, here = ("GPUs", "CPUs") if s.on_gpu else ("CPUs", "GPUs")
        precision = "bfloat16 or float16" if s.on_gpu else "float32"
        line = (
            f"reuse output {s.shown} was scored on {there} with dtype auto ({precision}), tonight on {here}"
        )
        _refuse_or_skip(spec, f"{line}: its results are not tonight's", skipped, progress)
    return keep, skipped


def match_schema(spec) -> pa.Schema:
    """The columns a match carries to the actor: its key, which output it came from, the result columns
    that output holds for it (but the content key, which the actor computes)."""
    fields = [f for f in get("score").result_fields(spec) if f.name != "content_key"]
    return pa.schema([pa.field("key", pa.binary(16)), pa.field("_source", pa.int16()), *fields])
