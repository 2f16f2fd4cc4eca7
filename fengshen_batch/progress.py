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
import time
from collections.abc import Callable
from pathlib import Path

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


class Display:
    """Job progress, live in a terminal or as periodic lines in a log.

    `update` is cheap and may be called for every batch; the display decides when to draw. Rows count input
    rows whose results have reached the driver; tokens, errors and shards count committed shards.
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
        self.rows = self.tokens = self.errors = 0
        self.echo, self.every_s = echo, every_s
        self.started = self.last = time.monotonic()
        self.live = sys.stdout.isatty() if live is None else live
        self.bar = None  # drawn from the first results on: what Ray prints while starting stays above it

    def _draw(self) -> None:
        from tqdm import tqdm

        # A pseudo-terminal may report a 0 x 0 size (none set; tqdm would then draw nothing): a fixed size
        # then, else follow resizes.
        width = {"dynamic_ncols": True} if _has_size() else {"ncols": 100, "nrows": 24}
        self.bar = tqdm(
            total=self.total_rows, unit=" rows", file=sys.stdout, leave=True, **width,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} rows [{elapsed}<{remaining}{postfix}]",
        )  # fmt: skip

    def _rate(self) -> float:
        return self.tokens / max(time.monotonic() - self.started, 1e-9)

    def _postfix(self) -> None:
        self.bar.set_postfix_str(
            f"{self._rate():,.0f} tok/s, {self.errors} errors, shards {self.shards}/{self.total_shards}",
            refresh=False,
        )

    def update(self, rows: int, tokens: int, errors: int, shards: int) -> None:
        """New totals (rows received, and tokens / errors / shards of committed shards)."""
        self.tokens, self.errors, self.shards = tokens, errors, shards
        if self.live and self.bar is None:
            self._draw()
        if self.bar is not None:
            self._postfix()
            self.bar.update(rows - self.rows)
            self.rows = rows
            return
        self.rows = rows
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.echo(self.line())

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = self.rows / elapsed if elapsed > 0 else 0.0
        eta = _clock((self.total_rows - self.rows) / rate) if rate else "?"
        return (
            f"{self.rows}/{self.total_rows} rows, {self._rate():,.0f} tokens/s, {self.errors} errors, "
            f"shards {self.shards}/{self.total_shards}, ETA {eta}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self._postfix()
            self.bar.refresh()
            self.bar.close()
            self.bar = None
