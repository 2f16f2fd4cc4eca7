"""The output schemas: input columns plus each job kind's result columns, or plus the error columns.

The driver needs only these (to write shards); it imports this module, not the engine-side `columns`.
"""

from __future__ import annotations

import pyarrow as pa

SCORE_FIELDS = [
    pa.field("nll_sum", pa.float64()),
    pa.field("token_count", pa.int64()),
    pa.field("ppl", pa.float64()),
    pa.field("byte_count", pa.int64()),
    pa.field("bits_per_byte", pa.float64()),
]
GENERATE_FIELDS = [
    pa.field("sample_index", pa.int32()),
    pa.field("generation", pa.string()),
    pa.field("prompt_tokens", pa.int32()),
    pa.field("generated_tokens", pa.int32()),
    pa.field("finish_reason", pa.string()),
    pa.field("generation_nll_sum", pa.float64()),
]
JUDGE_FIELDS = [
    pa.field("statements", pa.list_(pa.string())),
    pa.field("candidate_nll_sum", pa.list_(pa.float64())),
    pa.field("candidate_token_count", pa.list_(pa.int64())),
    pa.field("candidate_ppl", pa.list_(pa.float64())),
    pa.field("choice", pa.int32()),
    pa.field("margin", pa.float64()),
    pa.field("verdict", pa.bool_()),
]
# score jobs with a reference model: the same figures under it, and the Moore-Lewis difference
REFERENCE_FIELDS = [
    pa.field("ref_nll_sum", pa.float64()),
    pa.field("ref_token_count", pa.int64()),
    pa.field("ref_ppl", pa.float64()),
    pa.field("ref_bits_per_byte", pa.float64()),
    pa.field("bpb_diff", pa.float64()),  # bits_per_byte - ref_bits_per_byte: lower = more like the target
]
# token_logprobs: true (score and generate jobs)
TOKEN_FIELDS = [
    pa.field("token_ids", pa.list_(pa.int32())),
    pa.field("token_logprobs", pa.list_(pa.float32())),
]
ERROR_FIELDS = [pa.field("error_kind", pa.string()), pa.field("error_message", pa.string())]

KIND_FIELDS = {"score": SCORE_FIELDS, "generate": GENERATE_FIELDS, "judge": JUDGE_FIELDS}


def result_fields(spec) -> list[pa.Field]:
    """The columns a job adds to its input's, in order: its kind's, then those its options ask for."""
    fields = list(KIND_FIELDS[spec.kind])
    if spec.kind == "generate" and spec.prompt_template and spec.keep_prompt:
        fields.insert(0, pa.field(spec.prompt_column, pa.string()))  # the filled-in prompt
    if getattr(spec, "reference_model", None):
        fields += REFERENCE_FIELDS
    if getattr(spec, "token_logprobs", False):
        fields += TOKEN_FIELDS
    return fields


INPUT_ALIAS = "_input."  # an input column named like a result, while an actor processes the shard


def result_names(spec) -> list[str]:
    """Every column name a job writes besides its input's (the `bucket` column included), before any
    `result_prefix`."""
    names = [f.name for f in result_fields(spec)]
    if spec.kind == "score" and (spec.bucket_quantiles or spec.bucket_thresholds):
        names.append("bucket")
    return names


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
