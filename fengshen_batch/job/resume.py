"""A rerun over an output that already holds shards or a finished job: is it still the same input, and does
the output hold exactly the job's files when it is published?

Shards are named by index, so a file that appeared, changed or went away upstream between two runs changes
what an index means: resuming by index would publish one file's rows twice and lose another's. Every marker
keeps the file, row range and file version (size and ETag or mtime) its shard was planned from, and the
manifest keeps the files' versions; a rerun compares them with today's plan. A change is refused naming the
files (`on_input_change: fail`, the default), or with `recompute` the shards it touched are dropped and
computed again (a file inserted before others shifts every later shard's index: those are recomputed too).

Before `_SUCCESS`, part files no marker of the job names (a crashed attempt's, a shard the input no longer
has) are removed, and every committed shard's files must exist: a reader of `data/` gets exactly the rows the
manifest counts.
"""

from __future__ import annotations

from ..errors import JobError
from ..io.inputs import Inputs, Shard
from ..io.outputs import DATA, DUPLICATES, ERRORS, MARKERS, REUSE, SIGNATURES, OutputStore, part_name
from ..io.redact import redact_url

FIX = (
    "rerun with --on-input-change recompute (on_input_change: recompute) to redo the shards it touched, "
    "or use a new output"
)


def changed_shards(committed: dict[int, dict], shards: list[Shard]) -> list[int]:
    """Committed shards that no longer mean what they did: another file, rows, route or file version at their
    index, or no such shard in today's plan. Markers of older versions carry no file version: file and rows
    only."""
    by_index = {s.index: s for s in shards}
    changed = []
    for i, m in committed.items():
        s = by_index.get(i)
        same = s is not None and (
            m.get("file"),
            m.get("start"),
            m.get("stop"),
            m.get("route", 0),
            m.get("routes", 1),
        ) == (s.name, s.start, s.stop, s.route, s.routes)
        if not same or (m.get("version") and m["version"] != s.version):
            changed.append(i)
    return sorted(changed)


def _describe(old: dict[str, str | None], new: dict[str, str]) -> str:
    """'a.parquet is new, b.parquet changed, c.parquet is gone' from {file: version} before and now (a None
    version: not recorded, so only presence counts)."""
    added = [f for f in new if f not in old]
    gone = [f for f in old if f not in new]
    changed = [f for f in new if f in old and old[f] is not None and old[f] != new[f]]
    parts = (
        [f"{f} is new" for f in added] + [f"{f} changed" for f in changed] + [f"{f} is gone" for f in gone]
    )
    if not parts:
        return "files moved between shards"
    return ", ".join(parts[:5]) + (f" and {len(parts) - 5} more" if len(parts) > 5 else "")


def input_change(committed: dict[int, dict], shards: list[Shard]) -> str:
    """What changed, in the input's own file names: the files the committed shards came from against the
    files today's plan puts in the same span of shards (and wherever those files went)."""
    old: dict[str, str | None] = {}
    for m in committed.values():
        old.setdefault(m["file"], m.get("version") or None)
    last = max(committed)
    new = {s.name: s.version for s in shards if s.index <= last or s.name in old}
    return _describe(old, new)


def check_published(published: dict, inputs: Inputs, spec, store: OutputStore, progress) -> bool:
    """A finished output of this configuration: True when its input is today's (nothing to do). A changed
    input is refused, or (recompute) the output unpublished so that its markers decide what to redo."""
    files = published.get("input_files", [])
    old = {f["file"]: f.get("version") or None for f in files}
    new = {redact_url(f.url): f.version for f in inputs.files}
    if old.keys() != new.keys() or any(old[f] not in (None, new[f]) for f in new):
        what = _describe(old, new)
    elif {f["file"]: f.get("rows") for f in files} != {redact_url(f.url): f.rows for f in inputs.files}:
        what = "row counts differ"
    else:
        return True
    if spec.on_input_change == "fail":
        raise JobError(
            f"output {redact_url(spec.output)} holds a finished run of this job over another input "
            f"({what}); {FIX}"
        )
    store.unpublish()
    progress(f"the input changed since the finished run ({what}): recomputing the shards it touched")
    return False


def reconcile(
    committed: dict[int, dict], shards: list[Shard], spec, target: OutputStore, progress
) -> dict[int, dict]:
    """The committed shards a rerun may keep: those whose input is unchanged and whose files are all there."""
    changed = changed_shards(committed, shards)
    if changed and spec.on_input_change == "fail":
        raise JobError(
            f"the input changed since shards were committed to {redact_url(spec.output)} "
            f"({input_change(committed, shards)}): {len(changed)} committed shards no longer match "
            f"today's files, and resuming would duplicate or lose rows; {FIX}"
        )
    folders = (DATA, ERRORS, SIGNATURES) if getattr(spec, "dedup", None) else (DATA, ERRORS)
    have = {folder: target.own_files(folder) for folder in folders}
    lost = [
        i
        for i in committed
        if i not in changed and any(f"{part_name(i)}.parquet" not in have[f] for f in have)
    ]
    if changed:
        progress(f"the input changed: recomputing {len(changed)} of {len(committed)} committed shards")
    if lost:
        progress(
            f"{len(lost)} committed shard(s) lost their files (first: {part_name(min(lost))}): recomputing"
        )
    target.drop_shards([*changed, *lost])
    return {i: m for i, m in committed.items() if i not in changed and i not in lost}


def publish_exactly(target: OutputStore, committed: set[int], dedup: bool = False) -> None:
    """Before `_SUCCESS`: the part files no committed shard names are removed; every committed shard has its
    data, errors and marker files (and signatures, with `dedup`), or the job fails (a rerun redoes the shard)."""
    ext = {DATA: "parquet", ERRORS: "parquet", MARKERS: "json", SIGNATURES: "parquet", DUPLICATES: "parquet"}
    want = {folder: {f"{part_name(i)}.{e}" for i in committed} for folder, e in ext.items()}
    required = {DATA, ERRORS, MARKERS} | ({SIGNATURES} if dedup else set())  # duplicates: where some were
    if target.fs.exists(target.path_to(REUSE)):  # the reuse lookup's matches: every shard has taken its own
        target.fs.rm(target.path_to(REUSE), recursive=True)
    for folder in ext:
        have = target.own_files(folder)
        for name in sorted(have - want[folder]):
            target.fs.rm(target.path_to(folder, name))
        if folder in required and (missing := sorted(want[folder] - have)):
            target.drop_shards(int(n[5:11]) for n in missing)
            raise JobError(
                f"{len(missing)} committed shards lost their {folder}/ files before publishing (first: "
                f"{missing[0]}): something else writes to {redact_url(target.url)}; rerun to redo them"
            )
