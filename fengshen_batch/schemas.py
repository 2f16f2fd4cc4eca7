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
TOKEN_FIELDS = [pa.field("token_ids", pa.list_(pa.int32())), pa.field("token_logprobs", pa.list_(pa.float32()))]
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


def data_schema(input_schema: pa.Schema, spec) -> pa.Schema:
    return pa.schema([*input_schema, *result_fields(spec)])


def error_schema(input_schema: pa.Schema) -> pa.Schema:
    return pa.schema([*input_schema, *ERROR_FIELDS])
