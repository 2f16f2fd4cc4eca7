"""Fact judgment by perplexity, as Yuyuan-GPT2-3.5B's card describes: a question is rewritten into one
declarative statement per candidate answer, every statement is scored with the engine (lm-eval
`loglikelihood_rolling` semantics), and the statement the model finds least surprising wins.

Criteria (lower is better):
- `ppl`: per-token perplexity, exp(nll / tokens). Fair when statements differ in length: the default.
- `nll`: total negative log-likelihood. Fair only for statements of about the same length (it favours
  shorter ones), as in lm-eval's multiple-choice `acc`.
- `bpb`: bits per UTF-8 byte. Fair across tokenizations and scripts, e.g. Chinese against English
  candidates, or answers that the BPE splits very differently.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..model.load import Replica
from ..params import ScoreParams
from .rows import RowError, ScoreResult, check_text

CRITERIA = ("ppl", "nll", "bpb")

# Built-in question -> statement rules, tried in order; the first that matches is used. `{answer}` is the
# candidate, numbered groups are parts of the question. The README lists them with examples.
EN_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^what (is|are) (.+) used (?:for|to treat)\??$", re.I), "{2} {1} used for {answer}."),
    (re.compile(r"^what (?:does|do) (.+) cause\??$", re.I), "{1} causes {answer}."),
    (re.compile(r"^what (?:does|do) (.+) treat\??$", re.I), "{1} treats {answer}."),
    (re.compile(r"^which (\w+) (is|are|can|causes|treats) (.+?)\??$", re.I), "{answer} {2} {3}."),
    (re.compile(r"^what (is|are) (.+?)\??$", re.I), "{2} {1} {answer}."),
]
ZH_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^(.+?)(?:用于|用来)(?:治疗)?什么[？?]?$"), "{1}用于{answer}。"),
    (re.compile(r"^(.+?)(位于|在)哪里[？?]?$"), "{1}{2}{answer}。"),
    (re.compile(r"^什么\w{0,2}?(可以|能|会)(.+?)[？?]?$"), "{answer}{1}{2}。"),
    (re.compile(r"^(.+?)是什么[？?]?$"), "{1}是{answer}。"),
]


def _is_chinese(text: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" for c in text)


def _fill(template: str, match: re.Match, answer: str) -> str:
    out = template.replace("{answer}", answer)
    for i, group in enumerate(match.groups(), start=1):
        out = out.replace("{" + str(i) + "}", group)
    return out[:1].upper() + out[1:]


def declarative(question: str, answer: str, template: str = "auto") -> str:
    """The statement for one (question, answer). `auto` uses the built-in rules for the question's language
    (falling back to "question answer"); any other template is a format string with {question}/{answer}."""
    question, answer = question.strip(), answer.strip()
    if template != "auto":
        return template.replace("{question}", question).replace("{answer}", answer)
    for pattern, rule in ZH_RULES if _is_chinese(question) else EN_RULES:
        if match := pattern.match(question):
            return _fill(rule, match, answer)
    stem = question.rstrip("?？")
    return f"{stem}{answer}。" if _is_chinese(question) else f"{stem} {answer}."


def criterion_value(criterion: str, result: ScoreResult) -> float:
    if criterion == "ppl":
        return result.ppl
    if criterion == "nll":
        return result.nll_sum
    if criterion == "bpb":
        return result.bits_per_byte
    raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")


@dataclass(frozen=True)
class Judgment:
    statements: list[str]
    scores: list[ScoreResult]
    choice: int  # index of the chosen statement
    margin: float | None  # gap between the best two under the criterion; None with one statement
    verdict: bool | None  # single statement with a threshold: criterion value <= threshold


def choose(scores: Sequence[ScoreResult], criterion: str) -> tuple[int, float | None]:
    values = [criterion_value(criterion, s) for s in scores]
    order = sorted(range(len(values)), key=values.__getitem__)
    margin = values[order[1]] - values[order[0]] if len(values) > 1 else None
    return order[0], margin


def judge(
    replica: Replica,
    statement_lists: Sequence[object],
    criterion: str = "ppl",
    threshold: float | None = None,
    params: ScoreParams | None = None,
    token_budget: int = 16384,
) -> tuple[list[Judgment | RowError], int]:
    """Judge each row's statements. A row whose statements open with at least MIN_SHARED common tokens is
    scored through the cached prefill (`prefix_scoring`: the opening once); the others in one dense
    token-budget pass."""
    flat: list[str] = []
    spans: list[tuple[int, int] | RowError] = []
    for statements in statement_lists:
        if isinstance(statements, RowError):
            spans.append(statements)
            continue
        if not isinstance(statements, (list, tuple)) or not statements:
            spans.append(RowError("no_candidates", "the row has no candidate statements"))
            continue
        spans.append((len(flat), len(flat) + len(statements)))
        flat.extend(statements)
    scored, budget = _score_statements(replica, flat, spans, params, token_budget)
    results: list[Judgment | RowError] = []
    for span in spans:
        if isinstance(span, RowError):
            results.append(span)
            continue
        scores = scored[span[0] : span[1]]
        bad = next((s for s in scores if isinstance(s, RowError)), None)
        if bad:
            results.append(RowError(bad.kind, f"a candidate statement: {bad.message}"))
            continue
        choice, margin = choose(scores, criterion)
        verdict = None
        if len(scores) == 1 and threshold is not None:
            verdict = criterion_value(criterion, scores[0]) <= threshold
        results.append(Judgment(list(flat[span[0] : span[1]]), list(scores), choice, margin, verdict))
    return results, budget


def statement_lists(
    candidates: Sequence[object] | None,
    questions: Sequence[object] | None,
    answers: Sequence[object] | None,
    template: str = "auto",
) -> list[object]:
    """Per row: its statements (given, or built from question + answers), or a RowError."""
    if candidates is not None:
        return list(candidates)
    rows: list[object] = []
    for question, options in zip(questions, answers, strict=True):
        if not isinstance(question, str) or not question.strip():
            rows.append(
                RowError("null_text" if question is None else "empty_text", "the question is missing")
            )
        elif not options:
            rows.append(RowError("no_candidates", "the row has no candidate answers"))
        else:
            rows.append([declarative(question, str(a), template) for a in options])
    return rows


def _score_statements(replica, flat: list, spans: list, params, token_budget: int) -> tuple[list, int]:
    """A ScoreResult (or RowError) per statement of `flat`, rows given by `spans`; the dense budget that fit."""
    from .prefix_scoring import MIN_SHARED, score_shared, shared_prefix  # torch: actors only
    from .scoring import score_tokens

    tokens = [check_text(s) or replica.encode(s) for s in flat]
    shared_rows, dense = [], []
    for span in spans:
        if isinstance(span, RowError):
            continue
        lists = tokens[span[0] : span[1]]
        if (
            len(lists) > 1
            and all(isinstance(t, list) and 0 < len(t) <= replica.max_length for t in lists)
            and shared_prefix(lists) >= MIN_SHARED
        ):
            shared_rows.append(span)
        else:
            dense += range(*span)
    nll: dict[int, float | RowError] = {}  # statement index -> its NLL sum
    found, budget = score_tokens(replica, [tokens[i] for i in dense], params, token_budget)
    for i, r in zip(dense, found, strict=True):
        nll[i] = r if isinstance(r, RowError) else r[0]
    if shared_rows:
        found, _ = score_shared(replica, [tokens[a:b] for a, b in shared_rows], token_budget)
        for (a, _), row in zip(shared_rows, found, strict=True):
            nll.update(enumerate(row, start=a))
    scored = [
        nll[i] if isinstance(nll[i], RowError) else ScoreResult(nll[i], len(tokens[i]), len(flat[i].encode("utf-8")))
        for i in range(len(flat))
    ]  # fmt: skip
    return scored, budget
