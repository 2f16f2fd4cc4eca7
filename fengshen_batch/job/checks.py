"""Everything cheap that a job checks and plans before Ray starts or any replica loads, so that a bad job fails
in seconds with one line naming the problem: the spec's inputs (footers only), the output location, result
names against input columns, the models' config.json, the kind's own checks (a score job's baseline); then
the shards, and which of them an earlier run of the same configuration already committed."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from ..errors import JobError
from ..io.inputs import Inputs, Shard, inspect_inputs, make_shards
from ..io.outputs import DATA, ERRORS, OutputStore, part_name, spec_differences, spec_hash
from ..io.portable import portable_schema
from ..io.redact import redact_url
from ..io.storage import filesystem, storage_options
from ..kinds import get
from ..kinds.schemas import data_schema, error_schema, result_names
from ..model.source import check_model_source, model_version
from ..spec import spec_record
from .dedup import check_dedup
from .resume import check_published, reconcile


@dataclass
class JobPlan:
    """What the run needs from the checks: the inputs and their shards, where results go (`target`: the
    output, or an --overwrite run's staging beside it), the shards already committed there."""

    spec: object
    record: dict  # the spec as the manifest records it
    hash: str
    inputs: Inputs
    shards: list[Shard]
    store: OutputStore
    target: OutputStore
    committed: dict[int, dict]
    schemas: tuple[pa.Schema, pa.Schema]  # data and errors files
    context: dict = field(default_factory=dict)  # the kind's `before_run`
    lease: object = None  # the run's OutputLease: checked before every commit

    @property
    def todo(self) -> list[Shard]:
        return [s for s in self.shards if s.index not in self.committed]


def check_output_location(spec) -> None:
    """The output and the input are apart, both ways: results written into an input would be read as input
    by the next run, and an --overwrite of an output holding the input would delete the corpus."""
    in_fs, in_path = filesystem(spec.input, spec.storage)
    out_fs, out_path = filesystem(spec.output, spec.storage)
    a = in_fs.unstrip_protocol(in_path).rstrip("/")
    b = out_fs.unstrip_protocol(out_path).rstrip("/")
    if b == a or b.startswith(a + "/"):
        raise JobError(f"output {redact_url(spec.output)} is inside the input {redact_url(spec.input)}")
    if a.startswith(b + "/"):
        raise JobError(
            f"the input {redact_url(spec.input)} is inside the output {redact_url(spec.output)}: results would "
            "be written beside the input (and --overwrite would delete it); give the output a folder of its own"
        )


def check_result_names(spec, input_names: list[str], read: list[str]) -> None:
    """An input column named like a result (re-scoring last night's output, a CCNet corpus with its own
    `perplexity` beside `ppl`) is refused before anything starts, with the two ways out."""
    results = result_names(spec)
    both = [c for c in read if c in results]
    if both:
        raise JobError(
            f"input column {both[0]!r} is read by this job and is also one of its result names: rename it"
        )
    clash = [n for n in results if n in input_names]
    if clash and not spec.result_prefix:
        names = ", ".join(clash)
        raise JobError(
            f"the input already has {'columns' if len(clash) > 1 else 'a column'} {names}, which this job "
            f"writes: leave the input's out with drop_columns: [{names}] "
            f"({' '.join('--drop-column ' + c for c in clash)}), or name the results apart with "
            "result_prefix: new_ (--result-prefix new_)"
        )
    prefixed = [
        spec.result_prefix + n
        for n in results
        if spec.result_prefix and spec.result_prefix + n in input_names
    ]
    if prefixed:
        raise JobError(f"the input already has a column {prefixed[0]!r}: choose another result_prefix")


def check_models(spec) -> dict[str, str]:
    """The model (and reference model) exist and are GPT2, and the kind's settings fit the model (a generate
    job's max_new_tokens within its context): config.json only."""
    versions = {}
    for source in (spec.model, getattr(spec, "reference_model", None)):
        if source:
            options = storage_options(source, spec.storage)
            config = check_model_source(source, options, spec.trust_remote_code)
            if config is not None and source == spec.model:
                get(spec.kind).check_model(spec, config)
            if (version := model_version(source, options)) is not None:
                versions[source] = version
    return versions


def check_job(spec, progress) -> tuple[dict, Inputs, dict]:
    """The checks, in order; returns (the spec's record, its inputs, the kind's context)."""
    record = spec_record(spec)
    strings, lists, others = spec.input_columns()
    inputs = inspect_inputs(
        spec.input, spec.storage, strings[0] if strings else None, spec.id_column, tuple(lists), tuple(others),
        tuple(spec.number_columns()), spec.drop_columns,
    )  # fmt: skip
    check_output_location(spec)
    check_result_names(spec, inputs.schema.names, [c for c in [*strings, *lists, *others] if c])
    versions = check_models(spec)  # each URL-prefix model's version: every replica loads that one
    context = {**get(spec.kind).before_run(spec, record, progress), **check_dedup(spec)}
    return record, inputs, {**context, "model_versions": versions}


def plan_output(
    spec, record: dict, inputs: Inputs, context: dict, overwrite: bool, progress
) -> JobPlan | None:
    """The shards and where they go; None when the output already holds this job, finished."""
    hash_ = spec_hash(record)
    store = OutputStore(spec.output, spec.storage)
    if foreign := store.foreign_entries():
        # never written by this tool: not ours to mix results into, nor to delete with --overwrite
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise JobError(
            f"output {redact_url(spec.output)} holds {shown}, which no fengshen-batch job writes: it is not one "
            "of this tool's outputs"
            + (", and --overwrite deletes only those" if overwrite else "")
            + "; use a new output folder"
        )
    published = store.published_manifest()
    if published and not overwrite:
        if published.get("spec_hash") != hash_:
            differs = spec_differences(published.get("spec") or {}, record)
            raise JobError(
                f"output {redact_url(spec.output)} holds a finished job of a different configuration"
                + (f" ({differs})" if differs else "")
                + "; use a new output or --overwrite"
            )
        if check_published(published, inputs, spec, store, progress):
            progress(f"already complete: {redact_url(spec.output)} has _SUCCESS; nothing to do")
            return None
    # --overwrite over an existing output: build the new one beside it; the old one stays until it is done.
    target = store.staging() if overwrite and store.exists() else store
    committed = target.committed()
    if {m["spec_hash"] for m in committed.values()} - {hash_}:
        if not overwrite:
            raise JobError(
                f"output {redact_url(spec.output)} holds shards of a different job configuration; "
                "use a new output or --overwrite"
            )
        target.clear()  # an abandoned --overwrite of another configuration
        committed = {}
    routes = context.get("routes", 1)
    if committed and (earlier := max(m.get("routes", 1) for m in committed.values())) != routes:
        # the rows a committed shard holds depend on the routing: a rerun keeps the first run's
        progress(f"keeping the routing of the run that started this output: {earlier} route(s), not {routes}")
        routes = earlier
    shards = make_shards(inputs.files, spec.shard_rows, routes)
    if committed:
        committed = reconcile(committed, shards, spec, target, progress)
    schemas = (data_schema(inputs.schema, spec), error_schema(inputs.schema))
    plan = JobPlan(spec, record, hash_, inputs, shards, store, target, committed, schemas, context)
    if committed and any(portable_schema(s) != s for s in schemas):
        rewrite_older_shards(plan, progress)
    progress(
        f"{inputs.rows} rows in {len(inputs.files)} files, {len(shards)} shards "
        f"({len(shards) - len(plan.todo)} already committed)"
    )
    return plan


def rewrite_older_shards(plan: JobPlan, progress) -> None:
    """Shards an older version committed may hold nanosecond timestamps Spark cannot read: rewritten in the
    form this version writes, so that the resumed output reads as one (same spec, no refusal)."""
    from ..io.writer import make_portable

    target = plan.target
    paths = [
        target.path_to(folder, f"{part_name(i)}.parquet") for i in plan.committed for folder in (DATA, ERRORS)
    ]
    expected = {DATA: plan.schemas[0], ERRORS: plan.schemas[1]}
    changed = make_portable(target.url, plan.spec.storage, paths, expected)
    if changed:
        progress(f"rewrote {changed} files of earlier shards in the portable Parquet form")
