"""The run itself, on the driver: hand the shards to the model actors (`workers.pools`), and commit each shard
as its record arrives: its marker written, its summary folded into one running merge (O(bins) in memory,
not O(shards)), the progress display told. The actors' in-flight counts reach the display meanwhile
through the job's Board."""

from __future__ import annotations

import json
import threading
import time

from ..errors import JobInterrupted
from ..io.outputs import ShardStats
from ..kinds import get
from .checks import JobPlan
from .display import Display, phase_line


class RunningSummary:
    """The running merge of the shards' summaries (the kind's `merge`): a score or generate job's sketches,
    a labelled judge job's counts of correct answers."""

    def __init__(self, kind: str):
        self.merge = get(kind).merge
        self.merged: dict | None = None
        self.complete = True  # False once a shard has none (committed by an older version)

    def add(self, summary: dict | None) -> None:
        if summary is None:
            self.complete = False
        else:
            self.merged = summary if self.merged is None else self.merge([self.merged, summary])

    @property
    def result(self) -> dict | None:
        """The merge of every shard's summary, or None if one has none."""
        return self.merged if self.complete else None


class Commits:
    """What the run has committed so far: per shard its record (the markers' counts), and the running
    summary; the resumed shards' from their markers."""

    def __init__(self, plan: JobPlan):
        self.plan = plan
        self.summary = RunningSummary(plan.spec.kind)
        for marker in plan.committed.values():  # resumed shards: their summaries folded in, not kept
            self.summary.add(marker.pop("summary", None))
        self.stats: dict[int, dict] = dict(plan.committed)
        self.rows = self.tokens = self.errors = 0  # of the shards committed in this run
        self.last_at: float | None = None
        self._by_index = {s.index: s for s in plan.shards}

    def add(self, rec: dict) -> bool:
        """One commit record from an actor: the shard's marker written (once, whatever retries resent);
        whether it was new."""
        index, raw = rec.pop("shard"), rec.pop("summary")
        if index in self.stats:  # a retried call may report a shard twice: commit it once
            return False
        rec["error_kinds"] = json.loads(rec["error_kinds"] or "{}")
        rec["reused_from"] = json.loads(rec["reused_from"] or "{}")
        stats, summary = ShardStats(**rec), json.loads(raw) if raw else None
        if self.plan.lease is not None:  # another run took the output over: commit nothing more
            self.plan.lease.check()
        self.summary.add(summary)
        self.plan.target.commit(self._by_index[index], stats, self.plan.hash, summary)
        self.last_at = time.time()
        self.stats[index] = stats.__dict__
        self.rows += stats.rows
        self.tokens += stats.tokens
        self.errors += stats.errors
        return True

    def missing(self) -> list[int]:
        return [s.index for s in self.plan.shards if s.index not in self.stats]


def run_shards(plan: JobPlan, gpus: float, progress, startup: dict, started: float, ray_progress: bool,
               live: bool | None) -> tuple[Commits, float]:  # fmt: skip
    """Run the shards still to do through the actors and commit them; returns the commits and when the
    pipeline started. `startup` gains the first batch's and first shard's times and the actors' phases."""
    from ..workers import board as boards
    from ..workers import pools
    from ..workers.actors import actor_startup

    spec, todo = plan.spec, plan.todo
    commits = Commits(plan)
    total_rows = round(sum(s.planned_rows for s in todo))
    display = Display(total_rows, len(plan.shards), len(plan.committed), progress,
                      live=False if ray_progress else live)  # fmt: skip
    first_step, actors = get(spec.kind).first_step, spec.actors[0]

    def show(states: list[dict]) -> None:  # the actors' in-flight counts, and their phases before
        display.phase(phase_line(states, actors, first_step))
        display.in_flight(states)

    run_start = time.time()
    board, stop = boards.start_board(), threading.Event()
    watcher = boards.watch(board, show, stop)
    try:
        records = pools.run_pipeline(
            spec, todo, plan.inputs.id_column, gpus, plan.target.url, plan.schemas, ray_progress, board,
            plan.context.get("model_versions"),
        )  # fmt: skip
        for batch in records:
            if "first_batch" not in startup:
                startup["first_batch"] = time.time() - run_start
                startup.update(actor_startup(batch, run_start))
            for rec in batch.to_pylist():
                if commits.add(rec):
                    startup.setdefault("first_shard", time.time() - started)
            display.update(commits.rows, commits.tokens, commits.errors, len(commits.stats))
    except KeyboardInterrupt:  # Ctrl-C: the markers written so far are the job's progress
        raise JobInterrupted(len(commits.stats), len(plan.shards)) from None
    finally:
        stop.set()
        watcher.join(timeout=5)
        boards.stop_board(board)
        display.close()
    return commits, run_start
