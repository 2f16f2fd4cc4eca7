"""The output schemas: input columns plus each job kind's result columns, or plus the error columns.

The driver needs only these (to write shards); importing them imports no torch.
"""

from __future__ import annotations

import pyarrow as pa

from . import get

ERROR_FIELDS = [pa.field("error_kind", pa.string()), pa.field("error_message", pa.string())]


def result_fields(spec) -> list[pa.Field]:
    """The columns a job adds to its input's, in order (its kind's `result_fields`)."""
    return get(spec.kind).result_fields(spec)


INPUT_ALIAS = "_input."  # an input column named like a result, while an actor processes the shard


def result_names(spec) -> list[str]:
    """Every column name a job writes besides its input's (a score job's `bucket` included), before any
    `result_prefix`."""
    return get(spec.kind).result_names(spec)


def data_schema(input_schema: pa.Schema, spec) -> pa.Schema:
    """The data files' schema: input columns, then the results named with the spec's `result_prefix`."""
    return pa.schema(
        [*input_schema, *(f.with_name(spec.result_prefix + f.name) for f in result_fields(spec))]
    )


def internal_schemas(spec, data: pa.Schema, errors: pa.Schema) -> tuple[dict[str, str], pa.Schema, pa.Schema]:
    """How an actor names columns while it processes a shard: results by their own names (the engine and
    the summaries use those), an input column that has one of those names as INPUT_ALIAS + name. Returns
    (input renames, internal data schema, internal error schema); the files get `data`'s and `errors`'
    names back, position by position."""
    inputs = list(data)[: len(data) - len(result_fields(spec))]
    taken = set(result_names(spec))
    renamed = {f.name: INPUT_ALIAS + f.name for f in inputs if f.name in taken}

    def alias(f: pa.Field) -> pa.Field:
        return f.with_name(renamed.get(f.name, f.name))

    internal_data = pa.schema([*map(alias, inputs), *result_fields(spec)])
    internal_errors = pa.schema(
        [alias(f) if i < len(errors) - len(ERROR_FIELDS) else f for i, f in enumerate(errors)]
    )
    return renamed, internal_data, internal_errors


def error_schema(input_schema: pa.Schema) -> pa.Schema:
    return pa.schema([*input_schema, *ERROR_FIELDS])
