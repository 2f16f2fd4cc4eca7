"""The job's blackboard of in-flight work: each model actor's `Reporter` posts its cumulative counts and phase
to the driver's `Board` actor a few times a second (and adds their growth to Ray metrics); the driver's
`watch` thread reads them into the progress display, so the line moves from the first tokens on."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable

COUNTS = ("rows", "samples", "tokens", "errors")  # what each actor counts while it works


PUBLISH_EVERY_S = 0.5  # how often an actor publishes its counts, and the driver reads them


class Board:
    """The job's blackboard of in-flight work (a Ray actor of the driver's, `start_board`): each
    model actor posts its own cumulative counts and phase a few times a second, the driver reads them all.
    No call per row: one small message per actor per PUBLISH_EVERY_S, and only when something changed."""

    def __init__(self):
        self.actors: dict[str, dict] = {}

    def post(self, actor: str, state: dict) -> None:
        self.actors[actor] = state

    def read(self) -> dict[str, dict]:
        return self.actors


METRICS = {  # Ray metrics of a running job (exported as ray_fengshen_<name>_total; README: Watching a job)
    "rows": "input rows finished (generation: prompts whose samples are all done)",
    "samples": "samples generated",
    "tokens": "tokens generated (generation) or scored (scoring, judging)",
    "errors": "input rows sent to errors/",
}


class Reporter:
    """An actor's in-flight counts, posted to the job's Board a few times a second (when they changed) and
    added to Ray metrics (`ray.util.metrics` counters, tagged with the job's name and kind) as they grow.
    Made before the replica loads, so the driver's line can say it is loading (it may take minutes)."""

    def __init__(self, board, spec):
        import ray
        from ray.util.metrics import Counter

        self.board, self.engine_stats = board, None
        self.key = ray.get_runtime_context().get_actor_id() or "driver"
        self.tags = {"job": spec.name or spec.kind, "kind": spec.kind}
        self.counts = dict.fromkeys(COUNTS, 0)  # rows, samples, tokens, errors (scoring: added per slice)
        self.metrics = {
            k: Counter(f"fengshen_{k}", description=METRICS[k], tag_keys=("job", "kind")) for k in COUNTS
        }
        self.phase = "loading"
        self.posted = {"phase": None, **self.counts}  # the last state posted (its counts: in the metrics)
        self.lock = threading.Lock()
        self.flush()
        threading.Thread(target=self._loop, name="fengshen-progress", daemon=True).start()

    def ready(self, engine_stats=None) -> None:
        """The replica is loaded; a generate job's engine counts its prompts, samples and tokens itself."""
        self.engine_stats, self.phase = engine_stats, "ready"

    def add(self, **counts: int) -> None:
        for k, v in counts.items():
            self.counts[k] += v

    def state(self) -> dict:
        counts = dict(self.counts)
        if self.engine_stats is not None:  # generation: what the engine finished so far
            stats = self.engine_stats
            counts.update(
                rows=counts["rows"] + stats.finished_prompts,  # + rows that failed before the engine
                samples=stats.finished_samples,
                tokens=stats.sampled_tokens,
            )
        return {"phase": self.phase, **counts}

    def flush(self) -> None:
        """Post the counts and add their growth to the metrics now (also at the end of each call: a short
        job's actor may be gone before its next tick)."""
        with self.lock:
            state = self.state()
            if state == self.posted:
                return
            with contextlib.suppress(Exception):  # progress must never fail the work
                if self.board is not None:
                    self.board.post.remote(self.key, state)
                for k in COUNTS:
                    if state[k] > self.posted[k]:
                        self.metrics[k].inc(state[k] - self.posted[k], tags=self.tags)
            self.posted = state

    def _loop(self) -> None:
        while True:
            time.sleep(PUBLISH_EVERY_S)
            self.flush()


def start_board():
    """The job's Board of in-flight counts, a zero-CPU actor of this driver's (gone with it)."""
    import ray

    return ray.remote(num_cpus=0)(Board).remote()


def stop_board(board) -> None:
    """End the job's Board (a driver running several jobs keeps no old boards)."""
    import ray

    with contextlib.suppress(Exception):
        ray.kill(board)


def watch(board, show: Callable[[list[dict]], None], stop: threading.Event) -> threading.Thread:
    """A driver thread that reads the Board every PUBLISH_EVERY_S and shows the actors' states (`show`, the
    progress display's) until `stop` is set."""
    import ray

    def loop() -> None:
        while not stop.wait(PUBLISH_EVERY_S):
            try:
                states = list(ray.get(board.read.remote(), timeout=10).values())
            except Exception:  # noqa: BLE001 - a slow read is skipped, the next one tries again
                continue
            show(states)

    thread = threading.Thread(target=loop, name="fengshen-watch", daemon=True)
    thread.start()
    return thread
