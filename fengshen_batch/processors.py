"""The model step inside a user's own Ray Data pipeline, in the shape of Ray Data LLM's processors:

    import ray, fengshen_batch as fb

    ds = ray.data.read_json("s3://crawl/2026-11-21/").filter(lambda r: len(r["text"]) > 200)
    ds = fb.score(ds, model="s3://models/Wenzhong-GPT2-3.5B/", actors=4)      # lazy, like any Dataset step
    ds.write_parquet("s3://scores/2026-11-21/")

`score`, `generate` and `judge` take any `ray.data.Dataset` and the spec's keys (but `input` and `output`) as
keyword arguments, and return a lazy Dataset: every row with the job's result columns appended (the same names
and types as the job's data files; generation: one row per sample) and `error_kind`/`error_message` (null on a
good row), so one bad row never stops the pipeline. The actors run the job's own code (`workers.actors.RowsActor`:
the same replica, engine, batching and keyed seeds), so numbers equal the job's for the same rows and ids.
Unlike a job there are no markers, resume, errors/ folder or report: the pipeline owns its output. A job
gives exactly-once output, resumes after a failure and reports; a processor fits a step into a pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ray.data

_NOT_A_FILE = "<ray.data.Dataset>"  # the spec's input/output: the processor reads and writes no files


def _processor(kind: str, ds: ray.data.Dataset, fields: dict) -> ray.data.Dataset:
    from .errors import SpecError
    from .io.storage import storage_options
    from .model.source import check_model_source
    from .spec import build_spec
    from .workers import cluster, pools

    for key in ("input", "output", "kind"):
        if key in fields:
            raise SpecError(f"invalid processor arguments: {key}: the processor takes a Dataset, not a {key}")
    if fields.get("dedup") is not None or fields.get("dedup_output", "mark") != "mark":
        raise SpecError(
            "invalid processor arguments: dedup: near-duplicates are found across a whole job's output "
            "(signatures of every shard, then clusters): run it as a job, or dedup the Dataset yourself"
        )
    spec = build_spec({**fields, "kind": kind, "input": _NOT_A_FILE, "output": _NOT_A_FILE})
    for source in (spec.model, getattr(spec, "reference_model", None)):
        if source:  # before any actor starts, as a job checks it
            check_model_source(source, storage_options(source, spec.storage), spec.trust_remote_code)
    cluster.init_ray(spec.address, min_cpus=spec.actors[1] * spec.cpus_per_actor)
    _check_schema(spec, ds)
    gpus = (
        spec.gpus_per_actor if spec.gpus_per_actor is not None else (1.0 if cluster.cluster_gpus() else 0.0)
    )
    return pools.map_rows(ds, spec, gpus)


def _check_schema(spec, ds: ray.data.Dataset) -> None:
    """The columns the job needs, with their types, checked from the dataset's schema when the processor is
    built (an InputError now, not a task error when the pipeline runs). Ray Data knows a schema without
    executing for most sources; otherwise it computes the first block."""
    import pyarrow as pa

    from .errors import InputError
    from .io.inputs import ID_COLUMN, check_columns
    from .kinds import get

    schema = ds.schema(fetch_if_missing=True)
    if schema is None:  # an empty dataset: nothing to check, nothing to run
        return
    base = schema.base_schema if isinstance(schema.base_schema, pa.Schema) else pa.schema([])
    names = list(schema.names)
    strings, lists, others = spec.input_columns()
    id_column = spec.id_column or ID_COLUMN
    if id_column not in names and (get(spec.kind).needs_ids or spec.id_column):
        raise InputError(
            f"id column {id_column!r} not in the dataset (columns: {', '.join(names)}): samples are seeded by "
            "row id; add one or name it with id_column"
        )
    wanted = [c for c in [*strings, *lists, *others, *spec.number_columns()] if c]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise InputError(f"column {missing[0]!r} not in the dataset (columns: {', '.join(names)})")
    if base.names:  # Arrow types known: the job's own type checks
        check_columns(base, [c for c in strings if c], [c for c in lists if c], [], spec.number_columns())


def score(ds: ray.data.Dataset, **spec_keys) -> ray.data.Dataset:
    """Perplexity of each row's `text_column` (lm-eval `loglikelihood_rolling`), as a score job computes it."""
    return _processor("score", ds, spec_keys)


def generate(ds: ray.data.Dataset, **spec_keys) -> ray.data.Dataset:
    """`num_return_sequences` samples of each row's prompt, one output row each, seeded by the row's id
    (`id_column`, default `id`: the dataset must have it) as a generate job seeds them."""
    return _processor("generate", ds, spec_keys)


def judge(ds: ray.data.Dataset, **spec_keys) -> ray.data.Dataset:
    """Each row's candidate statements scored and the least surprising chosen, as a judge job does."""
    return _processor("judge", ds, spec_keys)
