"""The errors a user can fix, one base class for all of them.

Python callers catch `FengshenError` (or one kind); the CLI turns any of them into one line on stderr and exit
code 2. Each keeps the built-in base it had (ValueError, RuntimeError), so older `except` clauses still match.
Anything else that escapes is a bug, and shows its traceback.
"""

from __future__ import annotations


class FengshenError(Exception):
    """A problem the user can fix; the message names it and, where there is one, the way out."""


class SpecError(FengshenError, ValueError):
    """A job spec that cannot run; the message names each bad field."""


class InputError(FengshenError, ValueError):
    """The input cannot be read as specified; the message names the path or column."""


class ModelLoadError(FengshenError, RuntimeError):
    """The model cannot be loaded; the message names the source and what is wrong."""


class JobError(FengshenError, RuntimeError):
    """The job cannot run as specified (its output, a rerun's settings, a report of an unfinished job)."""


class SubmitError(FengshenError, RuntimeError):
    """Submission to a Ray cluster failed for a reason the user can fix; the message says what to set or do."""


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during a job: what was committed stays committed, and the same command resumes from
    there. A KeyboardInterrupt still (so Python callers stop as they would), which the CLI ends with exit 130."""

    def __init__(self, committed: int, shards: int):
        self.committed, self.shards = committed, shards
        super().__init__(
            f"interrupted: {committed} of {shards} shards committed; rerun the same command to resume"
        )
