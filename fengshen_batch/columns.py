"""Engine results as Arrow columns (the schemas they follow are in `schemas`).

Each job kind's results become output rows (`ROWS`: generation repeats an input row once per sample), then
columns: the result columns (null on a failed row) and `error_kind`/`error_message` (null on a good row). The
writer splits good rows into `data/` and failed ones into `errors/`; a processor returns them all.
"""

from __future__ import annotations

from .judging import Judgment
from .results import RowError, Sample, ScoreResult
from .schemas import result_fields


def _score_rows(r: ScoreResult) -> list[dict]:
    row = {"nll_sum": r.nll_sum, "token_count": r.token_count, "ppl": r.ppl, "byte_count": r.byte_count,
           "bits_per_byte": r.bits_per_byte, "token_ids": r.token_ids, "token_logprobs": r.token_logprobs}  # fmt: skip
    if (ref := r.reference) is not None:
        row |= {"ref_nll_sum": ref.nll_sum, "ref_token_count": ref.token_count, "ref_ppl": ref.ppl,
                "ref_bits_per_byte": ref.bits_per_byte, "bpb_diff": r.bits_per_byte - ref.bits_per_byte}  # fmt: skip
    return [row]


def _generate_rows(samples: list[Sample]) -> list[dict]:
    return [
        {"sample_index": s.sample_index, "generation": s.generation, "prompt_tokens": s.prompt_tokens,
         "generated_tokens": s.generated_tokens, "finish_reason": s.finish_reason,
         "generation_nll_sum": s.generation_nll_sum, "token_ids": s.token_ids, "token_logprobs": s.token_logprobs}
        for s in samples
    ]  # fmt: skip


def _judge_rows(j: Judgment) -> list[dict]:
    scores = j.scores
    return [{"statements": j.statements, "candidate_nll_sum": [s.nll_sum for s in scores],
             "candidate_token_count": [s.token_count for s in scores], "candidate_ppl": [s.ppl for s in scores],
             "choice": j.choice, "margin": j.margin, "verdict": j.verdict}]  # fmt: skip


# Per kind: the output rows (result values by column name) of one good input row.
ROWS = {"score": _score_rows, "generate": _generate_rows, "judge": _judge_rows}


def to_columns(
    spec, results: list, extra: dict[str, list]
) -> tuple[list[int], dict[str, list], list[RowError | None]]:
    """(input row of each output row, result columns, row error of each output row). `extra`: columns with
    one value per input row (the filled-in prompt)."""
    rows_of = ROWS[spec.kind]
    take, cols, errors = [], {f.name: [] for f in result_fields(spec)}, []
    for i, r in enumerate(results):
        failed = isinstance(r, RowError)
        for values in [{}] if failed else rows_of(r):
            take.append(i)
            errors.append(r if failed else None)
            for name, column in cols.items():
                column.append(extra[name][i] if name in extra else values.get(name))
    return take, cols, errors
