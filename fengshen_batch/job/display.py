"""What a user sees while a job runs, and the switches that keep Ray's own chatter out of it.

- In a terminal: one live line (tqdm): rows done / total, tokens/s, errors, shards committed / total, ETA.
- In a log (not a TTY: `ray job submit`, CI, cron): one plain line at most every 30 s.
- Either way, the end summary is printed by the job.

Ray's own displays are off by default (`--ray-progress` brings them back): Ray Data's progress bars, which
would draw over our line, and its executor INFO lines (starting execution, execution plan, execution
finished). Those are switched off where Ray documents it: `DataContext.enable_progress_bars`, and Ray Data's
logging configuration file (`RAY_DATA_LOGGING_CONFIG`, ray_data_logging.yaml beside this module: the console
handler at WARNING, the full log still written to the session's ray-data.log). Ray Data's warnings and errors
still reach the console, as do Ray's and the actors'.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..workers.board import COUNTS

LOG_EVERY_S = 30.0


RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")


_AUTH_MODE = "RAY_AUTH_MODE"


def quiet_ray(address: str | None, ray_progress: bool) -> None:
    """Set Ray's documented switches for what it prints; call before Ray is imported (it reads them once).

    An embedded Ray (no address) keeps token authentication, Ray's default for a new local cluster, but
    asked for explicitly (RAY_AUTH_MODE=token): Ray then does not print its "token authentication is
    enabled ... set RAY_AUTH_MODE=disabled to opt out" WARNING, a hint that cannot apply to a cluster that
    lives and dies with this job. A user's own RAY_AUTH_MODE / RAY_DATA_LOGGING_CONFIG always win.
    """
    if not ray_progress and "ray.data" not in sys.modules:
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_LOGGING))
    if not (address or os.environ.get("RAY_ADDRESS")) and "ray" not in sys.modules:
        os.environ.setdefault(_AUTH_MODE, "token")


class DropOwnHints(logging.Filter):
    """Ray Data's console filter for hints about switches this job set on purpose (the progress bars it
    turned off); everything else passes. Named in ray_data_logging.yaml."""

    HINTS = ("Progress bars disabled", "Progress bars for operators disabled")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.HINTS)


def _has_size() -> bool:
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except (OSError, ValueError):
        return False
    return size.columns > 0 and size.lines > 0


def _clock(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(max(0.0, seconds)))


def phase_line(states: list[dict], expected: int, first_step: str = "first batch") -> str | None:
    """What the job is doing before its first results: actors starting, loading the model, `first_step`."""
    if any(s.get("rows") or s.get("tokens") for s in states):
        return None
    loading = sum(s["phase"] == "loading" for s in states)
    ready = sum(s["phase"] in ("ready", "computing") for s in states)
    if not states:
        return f"starting {expected} model actor{'s' * (expected != 1)}"
    if not ready:
        return f"{loading} of {expected} actors loading the model"
    if any(s["phase"] == "computing" for s in states):
        return first_step
    return f"{ready} of {expected} actors ready"


class Display:
    """Job progress, live in a terminal or as periodic lines in a log.

    `update` (committed shards, from the main thread) and `live` (the actors' in-flight counts, from the
    watcher thread) are cheap; the display decides when to draw. Rows count input rows finished (for
    generation: prompts whose samples are all done), in flight or committed; tokens are the ones generated
    (generation) or scored; errors and shards count committed shards. Rates and the ETA (rows left / rows
    per second) count from the first counts seen, not from start-up. Before any rows, `phase` prints what is happening (once per change).
    """

    def __init__(
        self,
        total_rows: int,
        total_shards: int,
        committed_shards: int,
        echo: Callable[[str], None],
        live: bool | None = None,
        every_s: float = LOG_EVERY_S,
    ):
        self.total_rows, self.total_shards = total_rows, total_shards
        self.shards = committed_shards
        self.rows = self.tokens = self.errors = self.samples = 0
        self.committed = (0, 0, 0)  # rows, tokens, errors of the shards committed in this run
        self.echo, self.every_s = echo, every_s
        self.started = self.last = time.monotonic()
        self.first: tuple[float, int, int] | None = None  # when, and at which counts, work was first seen
        self.live = sys.stdout.isatty() if live is None else live
        self.bar = None  # drawn from the first results on: what Ray prints while starting stays above it
        self.lock = threading.Lock()  # the main thread and the watcher thread both update
        self._phase: str | None = None
        self._in_flight: dict = {}

    def phase(self, text: str | None) -> None:
        """Say what the job is doing, once per change, until its first results."""
        with self.lock:
            if text and text != self._phase and self.bar is None and not self.rows:
                self._phase = text
                self.echo(f"{text} ...")

    def in_flight(self, states: list[dict]) -> None:
        """The actors' cumulative counts (their latest posts): shown where ahead of the committed ones."""
        totals = {k: sum(s.get(k, 0) for s in states) for k in COUNTS}
        with self.lock:
            self._in_flight = totals
            self._show()

    def _draw(self) -> None:
        from tqdm import tqdm

        # A pseudo-terminal may report a 0 x 0 size (none set; tqdm would then draw nothing): a fixed size
        # then, else follow resizes.
        width = {"dynamic_ncols": True} if _has_size() else {"ncols": 100, "nrows": 24}
        self.bar = tqdm(
            total=self.total_rows, unit=" rows", file=sys.stdout, leave=True, **width,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} rows [{elapsed}<{remaining}{postfix}]",
        )  # fmt: skip

    def _since_first(self) -> tuple[float, int, int]:
        """(seconds, rows, tokens) since the first counts arrived: rates leave out Ray's and the model's
        start-up, which would drag them (and the ETA) down for the first minutes of a GPU job."""
        if self.first is None:
            return 0.0, 0, 0
        at, rows, tokens = self.first
        return time.monotonic() - at, self.rows - rows, self.tokens - tokens

    def _rate(self) -> float:
        seconds, _, tokens = self._since_first()
        return tokens / seconds if seconds > 0 else 0.0

    def _what(self) -> str:
        samples = f"{self.samples:,} samples, " if self.samples else ""
        return f"{samples}{self._rate():,.0f} tok/s, {self.errors} errors, shards {self.shards}/{self.total_shards}"

    def update(self, rows: int, tokens: int, errors: int, shards: int) -> None:
        """New totals of the shards committed in this run (rows, tokens, errors) and all shards committed."""
        with self.lock:
            self.committed, self.shards = (rows, tokens, errors), shards
            self._show()

    def _show(self) -> None:
        """Draw the larger of the committed and in-flight counts (a restarted actor's counts start over)."""
        live = self._in_flight
        rows = min(self.total_rows, max(self.committed[0], live.get("rows", 0)))
        self.tokens = live.get("tokens") or self.committed[1]
        self.errors = max(self.committed[2], live.get("errors", 0))
        self.samples = live.get("samples", 0)
        if not rows and not self.tokens and not self.shards:
            return
        if self.first is None:
            self.first = (time.monotonic(), rows, self.tokens)
        if self.live and self.bar is None:
            self._draw()
        if self.bar is not None:
            self.bar.set_postfix_str(self._what(), refresh=False)
            self.bar.update(rows - self.rows)  # redraws at most ~10 times a second (tqdm's own limit)
            self.rows = rows
            return
        self.rows = rows
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.echo(self.line())

    def line(self) -> str:
        seconds, rows, _ = self._since_first()
        rate = rows / seconds if seconds > 0 else 0.0
        eta = _clock((self.total_rows - self.rows) / rate) if rate else "?"
        return f"{self.rows}/{self.total_rows} rows, {self._what().replace('tok/s', 'tokens/s')}, ETA {eta}"

    def close(self) -> None:
        with self.lock:
            if self.bar is not None:
                self.bar.set_postfix_str(self._what(), refresh=False)
                self.bar.refresh()
                self.bar.close()
                self.bar = None
