"""Judge jobs: Yuyuan-style fact judgment. Each row's candidate statements (given, or built from a question
and its answers) are scored, the least surprising is chosen (`judging.py`), and with labels the job's
accuracy is counted per shard where the rows are and added up by the driver."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import pyarrow as pa

from ..reports.judge_sketch import accuracy  # noqa: F401  (the accuracy figures, here where callers look)
from .base import Kind, list_tokens
from .judging import CRITERIA, Judgment, choose, statement_lists
from .rows import ScoreResult

# The result columns a labelled shard's counts read
COUNTED = ["statements", "candidate_nll_sum", "candidate_token_count"]


def label_index(label: object, statements: Sequence[str], answers: Sequence[str] | None) -> int | None:
    """A label as a candidate index (None: the row is unlabelled): an index (an int, a whole float as pandas
    writes ints beside nulls, or a string of digits that is not itself a candidate's text), or the text of an
    answer or a statement. Raises ValueError for a label that names no candidate (an index out of range, a
    fraction, a text matching none): such a row is neither right nor wrong, and the job counts it."""
    if label is None or (isinstance(label, float) and math.isnan(label)):
        return None
    if isinstance(label, str):
        for options in (answers or [], statements):
            if label in options:
                return list(options).index(label)
        if not label.strip().lstrip("-").isdigit():
            raise ValueError(f"label {label[:80]!r} is not a candidate's text or an index")
        label = int(label)
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(f"label {label!r} is not a candidate's text or an index")
    if not 0 <= label < len(statements):
        raise ValueError(f"label {label} is out of range for {len(statements)} candidates")
    return label


def outcomes(
    rows: list[dict], label_column: str | None, answers_column: str | None, id_field: str
) -> list[dict]:
    """Per judged row (one shard's data): its id and statements, the label's candidate index (None when
    unlabelled or, with `invalid`, when the label names no candidate), the choice under each criterion, and
    the job's choice and margin: what the shard's summary (`reports.judge_sketch`) counts."""
    out = []
    for row in rows:
        statements = row["statements"]
        target, invalid = None, False
        if label_column:
            try:
                target = label_index(
                    row.get(label_column), statements, row.get(answers_column) if answers_column else None
                )
            except ValueError:
                invalid = True
        scores = [
            ScoreResult(nll, count, len(text.encode("utf-8")))
            for nll, count, text in zip(
                row["candidate_nll_sum"], row["candidate_token_count"], statements, strict=True
            )
        ]
        out.append({"id": row.get(id_field), "statements": statements, "target": target, "invalid": invalid,
                    "choices": {name: choose(scores, name)[0] for name in CRITERIA},
                    "choice": row.get("choice"), "margin": row.get("margin")})  # fmt: skip
    return out


def summarize_table(table, by: str | None, label_column, answers_column, id_field: str) -> dict:
    """The judge summary (`reports.judge_sketch`) of judged rows: a shard's, or an output's data files'."""
    from ..reports import judge_sketch

    groups, n_groups = judge_sketch.group_values(table.column(by) if by else None, by)
    judged = outcomes(table.to_pylist(), label_column, answers_column, id_field)
    return judge_sketch.summarize(judged, groups, n_groups, by)


def label_counts(rows: list[dict], label_column: str, answers_column: str | None) -> dict:
    """Labelled rows and correct choices per criterion among `rows` (one shard's data): the actor computes
    them where the rows are, and the driver adds up the shards' counts (`io.outputs.sum_counts`)."""
    from ..reports.judge_sketch import count_outcomes

    return count_outcomes(outcomes(rows, label_column, answers_column, "id"))


class Judge(Kind):
    name = "judge"
    fields = [
        pa.field("statements", pa.list_(pa.string())),
        pa.field("candidate_nll_sum", pa.list_(pa.float64())),
        pa.field("candidate_token_count", pa.list_(pa.int64())),
        pa.field("candidate_ppl", pa.list_(pa.float64())),
        pa.field("choice", pa.int32()),
        pa.field("margin", pa.float64()),
        pa.field("verdict", pa.bool_()),
    ]

    def items(self, spec, table, extra, ids):
        def column(name):
            return table.column(name).to_pylist() if name else None

        return statement_lists(
            column(spec.candidates_column), column(spec.question_column if spec.answers_column else None),
            column(spec.answers_column), spec.template,
        )  # fmt: skip

    def run(self, replicas, spec, items, ids, budget, usage):
        from .judging import judge

        return judge(replicas.model, items, spec.criterion, spec.threshold, spec.params(), budget)

    def rows(self, j: Judgment) -> list[dict]:
        scores = j.scores
        return [{"statements": j.statements, "candidate_nll_sum": [s.nll_sum for s in scores],
                 "candidate_token_count": [s.token_count for s in scores], "candidate_ppl": [s.ppl for s in scores],
                 "choice": j.choice, "margin": j.margin, "verdict": j.verdict}]  # fmt: skip

    def tokens(self, good: pa.Table) -> int:
        return list_tokens(good.column("candidate_token_count"))

    @staticmethod
    def _columns(spec, id_field: str) -> list[str]:
        extra = [spec.label_column, spec.answers_column, spec.report_by]
        return list(dict.fromkeys([*COUNTED, "choice", "margin", id_field, *[c for c in extra if c]]))

    def summarize(self, spec, data, renamed, id_field):
        return summarize_table(data.select(self._columns(spec, id_field)), spec.report_by, spec.label_column,
                               spec.answers_column, id_field)  # fmt: skip

    @staticmethod
    def _report(store, manifest, by, summaries):
        from ..reports.judge_report import build_judge_report

        spec = manifest["spec"]
        return build_judge_report(store, manifest, by, summaries, lambda table, by: summarize_table(
            table, by, spec.get("label_column"), spec.get("answers_column"), spec.get("id_column") or "id"))  # fmt: skip

    def merge(self, summaries):
        from ..reports.judge_sketch import merge

        return merge(summaries)

    def finish(self, spec, store, manifest, summary, context) -> None:
        """Accuracy against the labels and the report, from the shards' merged summary (shards committed by
        a version that did not summarise them: from the data files)."""
        t = time.time()
        report = self._report(store, manifest, spec.report_by, [summary])
        if spec.label_column:
            manifest["judge"] = {k: report[k] for k in
                                 ("criterion", "accuracy", "per_criterion", "labelled_rows", "invalid_label_rows")}  # fmt: skip
        manifest.setdefault("finish_seconds", {})["report"] = round(time.time() - t, 3)

    def plan_tokens(self, spec, rows, tokenizer, context):
        from .planning import judge_tokens

        return judge_tokens(spec, rows, tokenizer.encode), []

    def done_note(self, manifest) -> str:
        judged = manifest.get("judge")
        if not judged or judged["accuracy"] is None:
            return ""
        return (f", accuracy {judged['accuracy']:.1%} of {judged['labelled_rows']:,} labelled rows "
                f"({judged['criterion']})")  # fmt: skip

    def report_lines(self, manifest, context) -> list[str]:
        judged = manifest.get("judge") or {}
        if judged.get("invalid_label_rows"):
            return [f"warning: {judged['invalid_label_rows']} labels name no candidate and were not counted "
                    "(`judge.invalid_label_rows` in the manifest)"]  # fmt: skip
        return []

    def rebuild_report(self, store, manifest, by, summaries, compare):
        return self._report(store, manifest, by, summaries)


KIND = Judge()
