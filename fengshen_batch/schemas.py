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
ERROR_FIELDS = [pa.field("error_kind", pa.string()), pa.field("error_message", pa.string())]


RESULT_FIELDS = {"score": SCORE_FIELDS, "generate": GENERATE_FIELDS, "judge": JUDGE_FIELDS}


def data_schema(input_schema: pa.Schema, kind: str) -> pa.Schema:
    return pa.schema([*input_schema, *RESULT_FIELDS[kind]])


def error_schema(input_schema: pa.Schema) -> pa.Schema:
    return pa.schema([*input_schema, *ERROR_FIELDS])
