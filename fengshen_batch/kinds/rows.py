"""Per-row results of the engine. A row either succeeds or carries a `RowError`: the job never crashes on one."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa


@dataclass(frozen=True)
class RowError:
    """Why one input row could not be processed; it goes to the job's errors output."""

    kind: str  # machine-readable: null_text, empty_text, prompt_too_long, ...
    message: str


@dataclass(frozen=True)
class Reused:
    """A row's results taken from an earlier output (`reuse:`): its result columns' values as written
    there, by name."""

    values: dict


@dataclass(frozen=True)
class ScoreResult:
    nll_sum: float  # natural log, summed over every token of the text (float64)
    token_count: int
    byte_count: int  # UTF-8 bytes of the text
    # With token logprobs asked for: the text's token ids and the natural-log probability of each, in order
    token_ids: list[int] | None = None
    token_logprobs: list[float] | None = None
    reference: ScoreResult | None = None  # the same text under the job's reference model

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.token_count)

    @property
    def bits_per_byte(self) -> float:
        # Comparable across tokenizers and languages (Chinese costs several bytes a character).
        return self.nll_sum / (self.byte_count * math.log(2))


@dataclass(frozen=True)
class Sample:
    sample_index: int
    generation: str  # text after the prompt, cut before the first stop string
    prompt_tokens: int  # after any left truncation
    generated_tokens: int  # tokens produced, up to and including EOS or the one completing a stop string
    finish_reason: Literal["stop", "length"]
    generation_nll_sum: float  # -log p of the produced tokens at temperature 1, unwarped
    token_ids: list[int] | None = None  # the generated_tokens tokens
    token_logprobs: list[float] | None = None  # log p of each at temperature 1, before any warping
    # constrained: the output is complete and valid (matcher accepting, JSON parsed and validated); else None
    constraint_satisfied: bool | None = None
    cached_prompt_tokens: int | None = (
        None  # of prompt_tokens, those the prefix cache supplied (its request's)
    )

    @property
    def nll_per_token(self) -> float:
        """The fluency that best-of-n ranks samples by (lower is better)."""
        return self.generation_nll_sum / max(1, self.generated_tokens)


def check_text(text: object) -> RowError | None:
    """The row-level checks shared by scoring and generation."""
    if text is None:
        return RowError("null_text", "text is null")
    if not isinstance(text, str):
        return RowError("not_a_string", f"text is {type(text).__name__}, not a string")
    if text == "":
        return RowError("empty_text", "text is empty: nothing to score or continue")
    return None


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


def invalid_utf8(table: pa.Table) -> tuple[pa.Table, list[RowError | None] | None]:
    """String columns whose bytes are not valid UTF-8 (Parquet readers do not check them; converting them to
    Python strings raises, and would fail the whole shard on every rerun) -> (the table with each invalid
    sequence replaced by U+FFFD, so it can be written and read back; each such row's `invalid_utf8` error,
    or None where every value is valid). One full validation per column: clean inputs pay nothing else."""
    errors: list[RowError | None] | None = None
    for idx, field in enumerate(table.schema):
        if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
            continue
        column = table.column(idx)
        try:
            column.validate(full=True)
            continue
        except pa.ArrowInvalid:
            pass
        raw = column.cast(pa.large_binary() if pa.types.is_large_string(field.type) else pa.binary())
        fixed = []
        for r, value in enumerate(raw.to_pylist()):
            try:
                fixed.append(None if value is None else value.decode("utf-8"))
            except UnicodeDecodeError as e:
                fixed.append(value.decode("utf-8", errors="replace"))
                errors = errors or [None] * len(table)
                errors[r] = errors[r] or RowError(
                    "invalid_utf8",
                    f"column {field.name!r} is not valid UTF-8 (byte 0x{value[e.start]:02x} at byte {e.start}); "
                    "kept here with U+FFFD in place of each invalid sequence",
                )
        table = table.set_column(idx, field, pa.array(fixed, field.type))
    return table, errors


def first_errors(*lists: list[RowError | None] | None) -> list[RowError | None] | None:
    """Row errors from several checks, the first found per row (None: no check found any)."""
    given = [x for x in lists if x is not None]
    if not given:
        return None
    return [next((e for e in row if e is not None), None) for row in zip(*given, strict=True)]


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
