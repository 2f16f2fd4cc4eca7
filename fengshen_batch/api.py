"""The Python face of a job: what `fengshen-batch run` does, for scripts, notebooks and orchestrators.

    import fengshen_batch as fb

    job = fb.ScoreJob(model="s3://models/Yuyuan-GPT2-3.5B/", input="s3://corpus/", output="s3://scores/")
    result = fb.run(job)                 # or fb.run("jobs/nightly_score.yaml"), or fb.run({...spec keys...})
    result.counts["result_rows"], result.manifest["wall_seconds"]

`submit(job, address)` sends a job to a Ray cluster's Jobs API as `fengshen-batch submit` does. The CLI calls
this same `run`: the same checks before Ray starts, the same shards, markers, resume and report.
Problems raise `FengshenError` subclasses (`SpecError`, `InputError`, `ModelLoadError`, `JobError`) with the
one-line message the CLI prints; the CLI turns them into exit code 2.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .spec import AnyJob


@dataclass(frozen=True)
class JobResult:
    """What a finished job left: its output URL, its manifest (as OUTPUT/manifest.json holds it), and whether
    this call ran it or found it already complete (a rerun is a no-op)."""

    output: str
    manifest: dict
    already_complete: bool = False

    @property
    def counts(self) -> dict:
        """Input, result and error rows, error kinds, tokens (and a generate job's prompt-cache counts)."""
        return self.manifest["counts"]

    @property
    def drifted(self) -> bool:
        """A score job with a baseline and a drift_threshold: whether it drifted past it (its output is
        complete either way)."""
        return bool(self.manifest.get("drift", {}).get("exceeded"))


def as_spec(job: AnyJob | dict | str | Path) -> AnyJob:
    """A validated spec from a spec object, a dict of spec keys or a YAML file's path."""
    from .spec import JobBase, build_spec, load_spec

    if isinstance(job, JobBase):
        return job
    if isinstance(job, dict):
        return build_spec(job)
    if isinstance(job, (str, Path)):
        return load_spec(job)
    from .errors import SpecError

    raise SpecError(f"a job is a spec object, a dict of spec keys or a YAML path, not {type(job).__name__}")


def run(
    job: AnyJob | dict | str | Path,
    *,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = print,
    ray_progress: bool = False,
) -> JobResult:
    """Run `job` to completion, exactly as `fengshen-batch run` does, and return what it left.

    `overwrite`: replace a finished output of another configuration (the old one stays published until the
    new one is complete). `progress`: where the job's lines go (None: nowhere); in a terminal the live
    progress line draws itself. `ray_progress`: Ray Data's own progress bars as well."""
    from .io.outputs import OutputStore
    from .io.redact import redact_text
    from .job.run import run_job

    spec = as_spec(job)
    say = progress or (lambda _: None)
    manifest = run_job(spec, progress=lambda line: say(redact_text(line)), overwrite=overwrite,
                       ray_progress=ray_progress)  # fmt: skip
    if manifest.get("status") == "already_complete":
        return JobResult(spec.output, OutputStore(spec.output, spec.storage).published_manifest(), True)
    return JobResult(spec.output, manifest)


def plan(job: AnyJob | dict | str | Path):
    """What `job` would run, as `fengshen-batch plan` prints it (`Plan.lines()`), without starting Ray or
    loading a model: rows, shards (and those already committed), tokens from a sample as the job counts them,
    and an estimate of compute time and device-hours from measured rates. Raises what a run would raise
    before Ray starts (a bad spec, input, model or output)."""
    from .job.plan import plan_job

    return plan_job(as_spec(job))


def report(
    output: str,
    *,
    by: str | None = None,
    endpoint_url: str | None = None,
    baseline: str | None = None,
    baseline_check: bool | None = None,
    drift_threshold: float | dict | None = None,
) -> dict:
    """Rebuild OUTPUT/report/ of a finished score, generate or judge job from its shards' summaries (no pass over
    the rows unless `by` names another column than the job's `report_by`); return the report's summary.
    A score job's report is compared with `baseline` (default: the job's own), its drift judged against
    `drift_threshold` (default: the job's); `summary["drift"]["exceeded"]` says whether it drifted."""
    from .errors import JobError
    from .io.outputs import OutputStore
    from .io.storage import StorageSpec
    from .kinds import KINDS, get

    storage = StorageSpec(endpoint_url=endpoint_url)
    store = OutputStore(output, storage)
    manifest = store.published_manifest()
    if manifest is None:
        raise JobError(f"{output} has no _SUCCESS: only a finished job's output has a report")
    spec = manifest["spec"]
    kind = spec.get("kind", "score")
    if kind not in KINDS:
        raise JobError(f"{output} is the output of a {kind!r} job, which this version does not know")
    by = by or spec.get("report_by")
    summaries = [m.get("summary") for m in store.committed().values()]  # the shards' own, if they match

    def compare():  # a score job's: the baseline and drift threshold, the arguments' or the job's own
        return _baseline(manifest, storage, baseline, baseline_check, drift_threshold)

    try:
        return get(kind).rebuild_report(store, manifest, by, summaries, compare)
    except ValueError as e:
        raise JobError(str(e)) from None


def _baseline(manifest: dict, storage, url: str | None, check: bool | None, threshold: float | dict | None):
    """The baseline a report is compared with and the drift threshold: the arguments, else the job's own."""
    from pydantic import ValidationError

    from .errors import SpecError
    from .reports.baseline import load_baseline
    from .spec import DriftThreshold

    spec = manifest["spec"]
    url = url or spec.get("baseline")
    threshold = threshold if threshold is not None else spec.get("drift_threshold")
    if not url:
        return None, None
    check = spec.get("baseline_check", True) if check is None else check
    base = load_baseline(url, storage, spec, manifest.get("model_fingerprint") or {}, check)
    if threshold is None:
        return base, None
    try:
        return base, DriftThreshold.model_validate(threshold).model_dump()
    except ValidationError as e:
        raise SpecError(f"drift_threshold: {e.errors()[0]['msg']}") from None


def head(
    output: str,
    n: int = 10,
    *,
    errors: bool = False,
    columns: list[str] | None = None,
    endpoint_url: str | None = None,
):
    """The first `n` rows of an output's data (or, `errors`, of its errors) as a pyarrow Table, reading
    only as many shard files as that takes: a look at a job's results, finished or still running (its
    committed shards so far)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .errors import JobError
    from .io.outputs import DATA, ERRORS, OutputStore
    from .io.redact import redact_url
    from .io.storage import StorageSpec

    store = OutputStore(output, StorageSpec(endpoint_url=endpoint_url))
    folder = ERRORS if errors else DATA
    files = store.files(folder)
    if not files:
        raise JobError(
            f"{redact_url(output)} has no {folder}/ files: not a job's output, or no shard committed yet"
        )
    parts, have = [], 0
    for path in files:
        with store.fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            missing = [c for c in columns or [] if c not in pf.schema_arrow.names]
            if missing:
                raise JobError(
                    f"{folder}/ has no column {missing[0]!r}; it has {', '.join(pf.schema_arrow.names)}"
                )
            for batch in pf.iter_batches(batch_size=max(1, n), columns=columns):
                parts.append(batch.slice(0, n - have))
                have += len(parts[-1])
                if have >= n:
                    break
        if have >= n:
            break
    return (
        pa.Table.from_batches(parts) if parts else pq.read_schema(store.fs.open(files[0], "rb")).empty_table()
    )


@dataclass(frozen=True)
class Submission:
    """A job handed to a cluster: its submission id, whether this call created it (False: the same id had been
    submitted before, e.g. a nightly schedule firing twice), and its final status when waited for."""

    submission_id: str
    created: bool
    status: str | None = None


def submit(
    job: AnyJob | dict | str | Path,
    address: str,
    *,
    wait: bool = False,
    submission_id: str | None = None,
    working_dir: str | None = None,
    package: str = "image",
    progress: Callable[[str], None] | None = print,
) -> Submission:
    """Submit `job` to the Ray cluster at `address` (Jobs API), exactly as `fengshen-batch submit` does: the
    spec travels in the job's entrypoint, `package` says how fengshen-batch reaches the cluster (`image`,
    `py-modules`, `pip`), a submission id already used is not run again. Local paths of a YAML spec are
    relative to its folder; of a spec object or dict, to the current directory; a remote cluster refuses them
    (use bucket URLs). `wait`: follow the logs until the job ends and return its final status."""
    from .submission import submit as jobs

    echo = progress or (lambda _: None)
    with _spec_file(job, address) as path:
        sid, created = jobs.submit(
            str(path),
            address,
            submission_id=submission_id,
            working_dir=working_dir,
            package=package,
            echo=echo,
        )
    return Submission(sid, created, jobs.wait(address, sid, echo=echo) if wait else None)


@contextlib.contextmanager
def _spec_file(job: AnyJob | dict | str | Path, address: str) -> Iterator[Path]:
    """A YAML spec's own path; a spec object's fields (local paths made absolute) in a temporary file."""
    if isinstance(job, (str, Path)):
        yield Path(job)
        return
    import yaml

    from .submission.plan import resolve_paths

    spec = as_spec(job)
    fields = {"kind": spec.kind, **spec.model_dump(mode="json", exclude_unset=True)}
    fields = resolve_paths(fields, Path.cwd(), address)
    with tempfile.TemporaryDirectory(prefix="fengshen-submit-") as tmp:
        path = Path(tmp) / f"{spec.name or spec.kind}.yaml"
        path.write_text(yaml.safe_dump(fields, sort_keys=False, allow_unicode=True), encoding="utf-8")
        yield path
