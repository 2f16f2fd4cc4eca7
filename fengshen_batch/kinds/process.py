"""A batch of rows through its job kind's work: the one path the job's actors and the processors share.

The kind prepares each row's input (texts; statements from questions and answers; prompts, filled templates
and per-row limits) and runs it through the replica (scoring, judging, or the generation engine); a batch
that fails is retried row by row, so one bad row cannot fail the job. Results become output rows
(generation repeats an input row once per sample) and columns: the result columns (null on a failed row)
and `error_kind`/`error_message` (null on a good row). The writer splits good rows into `data/` and failed
ones into `errors/`; a processor returns them all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
import torch

from ..engine.replica import Replica
from ..io.redact import redact_text
from . import get
from .batching import empty_cuda_cache
from .rows import Reused, RowError
from .schemas import ERROR_FIELDS

log = logging.getLogger(__name__)


@dataclass
class Replicas:
    """What one actor computes with: its model, the generation engine over it (generate jobs), and the
    reference model (score jobs with one)."""

    model: Replica
    engine: object | None = None  # LLMEngine or EngineThread
    reference: Replica | None = None


def run_rows(
    replicas: Replicas, spec, items: list, ids: list[str], budget: int, usage=None
) -> tuple[list, int]:
    """The kind's work on a batch; if the batch fails, row by row, so that one bad row cannot fail the job.

    Out of memory at the smallest batch (the kind's own back-off already down to one row, or the engine's to
    one sequence) is retried once with the CUDA cache emptied, then row by row; a row that runs out of
    memory alone, twice, goes to errors/ as `out_of_memory` and the job goes on (Ray Data would not retry
    an exception raised in an actor's call: the whole job would fail on it, and on every rerun).
    """
    kind = get(spec.kind)
    for attempt in range(2):
        try:
            return kind.run(replicas, spec, items, ids, budget, usage)
        except torch.OutOfMemoryError:
            empty_cuda_cache()
            log.warning("out of memory on a batch of %d rows at the smallest batch (attempt %d of 2)%s",
                        len(items), attempt + 1, "; retrying row by row" if attempt else "")  # fmt: skip
        except Exception:
            log.exception("batch of %d rows failed; retrying row by row", len(items))
            break
    results = []
    for item, row_id in zip(items, ids, strict=True):
        result = None
        for _attempt in range(2):
            try:
                (result,), budget = kind.run(replicas, spec, [item], [row_id], budget, usage)
                break
            except torch.OutOfMemoryError:
                empty_cuda_cache()
                result = RowError(
                    "out_of_memory",
                    "out of memory on this row alone, twice (on the GPU, with the smallest batch): a "
                    "shorter text, a smaller max_new_tokens or num_return_sequences, or a larger GPU",
                )
            except Exception as e:
                result = RowError("engine_error", redact_text(f"{type(e).__name__}: {e}")[:2000])
                break
        results.append(result)
    return results, budget


def to_columns(spec, results: list, extra: dict[str, list]) -> tuple[list[int], dict[str, list], list]:
    """(input row of each output row, result columns, row error of each output row). `extra`: columns with
    one value per input row (the filled-in prompt)."""
    kind = get(spec.kind)
    take, cols, errors = [], {f.name: [] for f in kind.result_fields(spec)}, []
    for i, r in enumerate(results):
        failed = isinstance(r, RowError)
        for values in [{}] if failed else [r.values] if isinstance(r, Reused) else kind.rows(r):
            take.append(i)
            errors.append(r if failed else None)
            for name, column in cols.items():
                column.append(extra[name][i] if name in extra else values.get(name))
    return take, cols, errors


def process_table(
    replicas: Replicas,
    spec,
    table: pa.Table,
    id_field: str,
    token_budget: int,
    row_errors: list[RowError | None] | None = None,
    usage=None,
    reused: list[Reused | None] | None = None,
) -> tuple[pa.Table, int]:
    """Run the kind's work on one batch; return (input rows + result and error columns, the budget that
    fit). `row_errors`: rows already known bad (their RowError), which the engine never sees; `usage`:
    generation's prompt tokens and prefix-cache hits are added to it; `reused`: rows whose results an
    earlier output holds (score jobs' `reuse`), which the model never sees either."""
    kind = get(spec.kind)
    ids = [str(i) for i in table.column(id_field).to_pylist()]
    extra: dict[str, list] = {}
    items = kind.items(spec, table, extra, ids)
    results = list(row_errors or [None] * len(items))
    for i, known in enumerate(reused or ()):
        if known is not None and results[i] is None:
            results[i] = known
    good = [i for i, e in enumerate(results) if e is None]
    found, budget = run_rows(
        replicas, spec, [items[i] for i in good], [ids[i] for i in good], token_budget, usage
    )
    for i, r in zip(good, found, strict=True):
        results[i] = r
    take, cols, errors = to_columns(spec, results, extra)
    out = table.take(pa.array(take, pa.int64()))
    for f in kind.result_fields(spec):
        out = out.append_column(f, pa.array(cols[f.name], f.type))
    out = out.append_column(ERROR_FIELDS[0], pa.array([e and e.kind for e in errors], pa.string()))
    out = out.append_column(ERROR_FIELDS[1], pa.array([e and e.message for e in errors], pa.string()))
    return out, budget
