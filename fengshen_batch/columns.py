"""Engine results as Arrow columns (the schemas they follow are in `schemas`).

A batch from the pipeline carries the input columns plus `_shard`/`_row`; the model stage appends the result
columns (null on a failed row) and `error_kind`/`error_message` (null on a good row). Generation repeats an
input row once per sample. The writer splits good rows into `data/` and failed ones into `errors/`.
"""

from __future__ import annotations

import logging

import pyarrow as pa
import torch

from .generation import generate
from .judging import Judgment, judge, statement_lists
from .loading import Replica
from .results import RowError, Sample, ScoreResult
from .schemas import ERROR_FIELDS, RESULT_FIELDS
from .scoring import score_texts

log = logging.getLogger(__name__)


def _score_values(r: ScoreResult) -> list[tuple]:
    return [(r.nll_sum, r.token_count, r.ppl, r.byte_count, r.bits_per_byte)]


def _generate_values(samples: list[Sample]) -> list[tuple]:
    return [
        (
            s.sample_index,
            s.generation,
            s.prompt_tokens,
            s.generated_tokens,
            s.finish_reason,
            s.generation_nll_sum,
        )
        for s in samples
    ]


def _judge_values(j: Judgment) -> list[tuple]:
    scores = j.scores
    return [
        (
            j.statements,
            [s.nll_sum for s in scores],
            [s.token_count for s in scores],
            [s.ppl for s in scores],
            j.choice,
            j.margin,
            j.verdict,
        )
    ]


# Per kind: one tuple of values (in RESULT_FIELDS order) per output row of a good input row.
VALUES = {"score": _score_values, "generate": _generate_values, "judge": _judge_values}


def _columns(kind: str, results: list) -> tuple[list[int], dict[str, list], list[RowError | None]]:
    """(input row of each output row, result columns, row error of each output row)."""
    fields, values_of = RESULT_FIELDS[kind], VALUES[kind]
    take, cols, errors = [], {f.name: [] for f in fields}, []
    for i, r in enumerate(results):
        failed = isinstance(r, RowError)
        for values in [(None,) * len(fields)] if failed else values_of(r):
            take.append(i)
            errors.append(r if failed else None)
            for f, v in zip(fields, values, strict=True):
                cols[f.name].append(v)
    return take, cols, errors


def _run_engine(replica: Replica, spec, items: list, ids: list[str], budget: int, engine) -> tuple[list, int]:
    if spec.kind == "score":
        return score_texts(replica, items, spec.params(), budget)
    if spec.kind == "judge":
        return judge(replica, items, spec.criterion, spec.threshold, spec.params(), budget)
    prompts, limits = zip(*items, strict=True) if items else ((), ())
    return generate(replica, prompts, ids, spec.params(), limits, engine), budget


def run_rows(
    replica: Replica, spec, items: list, ids: list[str], budget: int, engine=None
) -> tuple[list, int]:
    """The engine on a batch; if the batch fails, row by row, so that one bad row cannot fail the job.

    CUDA out-of-memory is not a row's fault: it propagates (after the engine's own back-off) and Ray
    retries the batch. `engine`: the replica's generation engine (generate jobs).
    """
    try:
        return _run_engine(replica, spec, items, ids, budget, engine)
    except torch.OutOfMemoryError:
        raise
    except Exception:
        log.exception("batch of %d rows failed; retrying row by row", len(items))
    results = []
    for item, row_id in zip(items, ids, strict=True):
        try:
            (result,), budget = _run_engine(replica, spec, [item], [row_id], budget, engine)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            result = RowError("engine_error", f"{type(e).__name__}: {e}"[:2000])
        results.append(result)
    return results, budget


def process_table(
    replica: Replica, spec, table: pa.Table, id_field: str, token_budget: int, engine=None
) -> tuple[pa.Table, int]:
    """Run the engine on one batch; return (input rows + result and error columns, the budget that fit)."""
    ids = [str(i) for i in table.column(id_field).to_pylist()]
    if spec.kind == "judge":

        def column(name):
            return table.column(name).to_pylist() if name else None

        items = statement_lists(
            column(spec.candidates_column), column(spec.question_column if spec.answers_column else None),
            column(spec.answers_column), spec.template,
        )  # fmt: skip
    elif spec.kind == "generate":
        prompts = table.column(spec.text_field).to_pylist()
        column = spec.max_new_tokens_column
        limits = table.column(column).to_pylist() if column else [None] * len(prompts)
        items = list(zip(prompts, limits, strict=True))
    else:
        items = table.column(spec.text_field).to_pylist()
    results, budget = run_rows(replica, spec, items, ids, token_budget, engine)
    take, cols, errors = _columns(spec.kind, results)
    out = table.take(pa.array(take, pa.int64()))
    for f in RESULT_FIELDS[spec.kind]:
        out = out.append_column(f, pa.array(cols[f.name], f.type))
    out = out.append_column(ERROR_FIELDS[0], pa.array([e and e.kind for e in errors], pa.string()))
    out = out.append_column(ERROR_FIELDS[1], pa.array([e and e.message for e in errors], pa.string()))
    return out, budget
