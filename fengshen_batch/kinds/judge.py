"""Judge jobs: Yuyuan-style fact judgment. Each row's candidate statements (given, or built from a question
and its answers) are scored, the least surprising is chosen (`judging.py`), and with labels the job's
accuracy is counted per shard where the rows are and added up by the driver."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import pyarrow as pa

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


def label_counts(rows: list[dict], label_column: str, answers_column: str | None) -> dict:
    """Labelled rows and correct choices per criterion among `rows` (one shard's data): the actor computes
    them where the rows are, and the driver adds up the shards' counts (`io.outputs.sum_counts`) instead of reading
    the output back after the job."""
    correct = dict.fromkeys(CRITERIA, 0)
    labelled = invalid = 0
    for row in rows:
        statements = row["statements"]
        try:
            target = label_index(
                row.get(label_column), statements, row.get(answers_column) if answers_column else None
            )
        except ValueError:
            invalid += 1
            continue
        if target is None:
            continue
        labelled += 1
        scores = [
            ScoreResult(nll, count, len(text.encode("utf-8")))
            for nll, count, text in zip(
                row["candidate_nll_sum"], row["candidate_token_count"], statements, strict=True
            )
        ]
        for name in CRITERIA:
            correct[name] += int(choose(scores, name)[0] == target)
    return {"labelled": labelled, "invalid": invalid, "correct": correct}


def accuracy(counts: dict, criterion: str) -> dict:
    """Accuracy of the choices against labels, for the job's criterion and for each criterion."""
    labelled = counts["labelled"]
    per = {name: (counts["correct"][name] / labelled if labelled else None) for name in CRITERIA}
    return {
        "criterion": criterion,
        "accuracy": per[criterion],
        "per_criterion": per,
        "labelled_rows": labelled,
        # labels that name no candidate (out of range, a fraction, a text matching none): not counted above
        "invalid_label_rows": counts.get("invalid", 0),
    }


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

    def items(self, spec, table, extra):
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
    def _label_columns(spec) -> list[str]:
        return [*COUNTED, spec.label_column, *([spec.answers_column] if spec.answers_column else [])]

    def summarize(self, spec, data, renamed, id_field):
        if not spec.label_column:
            return None
        rows = data.select(self._label_columns(spec)).to_pylist()
        return label_counts(rows, spec.label_column, spec.answers_column)

    def finish(self, spec, store, manifest, summary, context) -> None:
        """Accuracy against the labels, from the shards' counts."""
        if not spec.label_column:
            return
        from ..io.outputs import DATA

        t = time.time()
        if summary is None:  # shards committed by a version that did not count: read their labels back
            columns = self._label_columns(spec)
            names = {f.name for f in self.fields}
            table = store.read(DATA, [spec.result_prefix + c if c in names else c for c in columns])
            rows = table.rename_columns(columns).to_pylist()
            summary = label_counts(rows, spec.label_column, spec.answers_column)
        manifest["judge"] = accuracy(summary, spec.criterion)
        manifest.setdefault("finish_seconds", {})["accuracy"] = round(time.time() - t, 3)


KIND = Judge()
