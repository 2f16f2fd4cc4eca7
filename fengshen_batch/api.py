"""The Python face of a job: what `fengshen-batch run` does, for scripts, notebooks and orchestrators.

    import fengshen_batch as fb

    job = fb.ScoreJob(kind="score", model="s3://models/Yuyuan-GPT2-3.5B/", input="s3://corpus/", output="s3://scores/")
    result = fb.run(job)                 # or fb.run("jobs/nightly_score.yaml"), or fb.run({...spec keys...})
    result.counts["result_rows"], result.manifest["report"]

The CLI calls this same `run`: the same checks before Ray starts, the same shards, markers, resume and report.
Problems raise `FengshenError` subclasses (`SpecError`, `InputError`, `ModelLoadError`, `JobError`) with the
one-line message the CLI prints; the CLI turns them into exit code 2.
"""

from __future__ import annotations

from collections.abc import Callable
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
    from .job import run_job
    from .outputs import OutputStore

    spec = as_spec(job)
    manifest = run_job(
        spec, progress=progress or (lambda _: None), overwrite=overwrite, ray_progress=ray_progress
    )
    if manifest.get("status") == "already_complete":
        return JobResult(spec.output, OutputStore(spec.output, spec.storage).published_manifest(), True)
    return JobResult(spec.output, manifest)
