"""A batch of rows through its job kind's work: the one path the job's actors and the processors share.

Per kind, the batch's inputs are prepared (texts; statements from questions and answers; prompts, filled
templates and per-row limits), run through the replica (scoring, judging, or the generation engine; a batch
that fails is retried row by row, so one bad row cannot fail the job), and turned into columns (`columns.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import pyarrow as pa
import torch

from .columns import to_columns
from .generation import PromptUsage, generate, keep_best
from .judging import judge, statement_lists
from .loading import Replica
from .results import RowError
from .schemas import ERROR_FIELDS, result_fields
from .scoring import score_texts

log = logging.getLogger(__name__)


@dataclass
class Replicas:
    """What one actor computes with: its model, the generation engine over it (generate jobs), and the
    reference model (score jobs with one)."""

    model: Replica
    engine: object | None = None  # LLMEngine or EngineThread
    reference: Replica | None = None


def _with_reference(main: list, ref: list) -> list:
    """Each text's result under the model with its result under the reference attached; a text the
    reference cannot score is a row error too."""
    return [m if isinstance(m, RowError) else r if isinstance(r, RowError) else replace(m, reference=r)
            for m, r in zip(main, ref, strict=True)]  # fmt: skip


def _run_engine(
    replicas: Replicas, spec, items: list, ids: list[str], budget: int, usage: PromptUsage | None = None
) -> tuple[list, int]:
    replica = replicas.model
    if spec.kind == "score":
        results, budget = score_texts(replica, items, spec.params(), budget, spec.token_logprobs)
        if replicas.reference is not None:
            ref, budget = score_texts(replicas.reference, items, spec.params(), budget)
            results = _with_reference(results, ref)
        return results, budget
    if spec.kind == "judge":
        return judge(replica, items, spec.criterion, spec.threshold, spec.params(), budget)
    prompts, limits = zip(*items, strict=True) if items else ((), ())
    results = generate(replica, prompts, ids, spec.params(), limits, replicas.engine, usage)
    if spec.keep_best:
        results = [r if isinstance(r, RowError) else keep_best(r, spec.keep_best) for r in results]
    return results, budget


def run_rows(
    replicas: Replicas, spec, items: list, ids: list[str], budget: int, usage: PromptUsage | None = None
) -> tuple[list, int]:
    """The engine on a batch; if the batch fails, row by row, so that one bad row cannot fail the job.

    CUDA out-of-memory is not a row's fault: it propagates (after the engine's own back-off) and Ray
    retries the batch.
    """
    try:
        return _run_engine(replicas, spec, items, ids, budget, usage=usage)
    except torch.OutOfMemoryError:
        raise
    except Exception:
        log.exception("batch of %d rows failed; retrying row by row", len(items))
    results = []
    for item, row_id in zip(items, ids, strict=True):
        try:
            (result,), budget = _run_engine(replicas, spec, [item], [row_id], budget, usage=usage)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            result = RowError("engine_error", f"{type(e).__name__}: {e}"[:2000])
        results.append(result)
    return results, budget


def fill_template(template: str, columns: list[str], row: dict) -> str | RowError:
    """The row's prompt from `template` (str.format over its columns); a null in a named column, or a value
    its format spec cannot take, is the row's error."""
    missing = [c for c in columns if row[c] is None]
    if missing:
        return RowError("null_template_field", f"template column {missing[0]!r} is null in this row")
    try:
        return template.format(**row)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        return RowError("bad_template_value", f"prompt_template: {type(e).__name__}: {e}"[:2000])


def id_errors(ids: list) -> list[RowError | None]:
    """A null id, or an id seen earlier in the same rows (a shard), is that row's error: results are
    joined and samples seeded by id, so it must name one row."""
    seen: set = set()
    out: list[RowError | None] = []
    for i in ids:
        if i is None:
            out.append(RowError("null_id", "the row's id is null"))
        elif i in seen:
            out.append(RowError("duplicate_id", f"id {str(i)[:200]!r} appears earlier in this shard"))
        else:
            seen.add(i)
            out.append(None)
    return out


def process_table(
    replicas: Replicas,
    spec,
    table: pa.Table,
    id_field: str,
    token_budget: int,
    row_errors: list[RowError | None] | None = None,
    usage: PromptUsage | None = None,
) -> tuple[pa.Table, int]:
    """Run the engine on one batch; return (input rows + result and error columns, the budget that fit).
    `row_errors`: rows already known bad (their RowError), which the engine never sees; `usage`: generation's
    prompt tokens and prefix-cache hits are added to it."""
    ids = [str(i) for i in table.column(id_field).to_pylist()]
    extra: dict[str, list] = {}
    if spec.kind == "judge":

        def column(name):
            return table.column(name).to_pylist() if name else None

        items = statement_lists(
            column(spec.candidates_column), column(spec.question_column if spec.answers_column else None),
            column(spec.answers_column), spec.template,
        )  # fmt: skip
    elif spec.kind == "generate":
        if spec.prompt_template:
            names = spec.template_columns()
            rows = table.select(names).to_pylist()
            prompts = [fill_template(spec.prompt_template, names, row) for row in rows]
            if spec.keep_prompt:
                extra[spec.prompt_column] = [p if isinstance(p, str) else None for p in prompts]
        else:
            prompts = table.column(spec.text_field).to_pylist()
        column = spec.max_new_tokens_column
        limits = table.column(column).to_pylist() if column else [None] * len(prompts)
        items = list(zip(prompts, limits, strict=True))
    else:
        items = table.column(spec.text_field).to_pylist()
    results = list(row_errors or [None] * len(items))
    good = [i for i, e in enumerate(results) if e is None]
    found, budget = run_rows(
        replicas, spec, [items[i] for i in good], [ids[i] for i in good], token_budget, usage
    )
    for i, r in zip(good, found, strict=True):
        results[i] = r
    take, cols, errors = to_columns(spec, results, extra)
    out = table.take(pa.array(take, pa.int64()))
    for f in result_fields(spec):
        out = out.append_column(f, pa.array(cols[f.name], f.type))
    out = out.append_column(ERROR_FIELDS[0], pa.array([e and e.kind for e in errors], pa.string()))
    out = out.append_column(ERROR_FIELDS[1], pa.array([e and e.message for e in errors], pa.string()))
    return out, budget
