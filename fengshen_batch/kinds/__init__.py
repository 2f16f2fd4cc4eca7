"""Job kinds: one module per kind, each with one `Kind` (its rows, results, columns, summaries and finish
step: `base.py` is the contract), looked up by name. The model work behind them:

score.py     perplexity of each text        -> scoring.py (lm-eval rolling windows), batching.py
generate.py  samples of each prompt         -> generation.py (requests to the engine/)
judge.py     the least surprising statement -> judging.py (statements), prefix_scoring.py (shared openings)

rows.py (each row's result or error), schemas.py (the output schemas), process.py (a batch of rows through
its kind: the one path the job's actors and the processors share). Adding a kind: a module with a `Kind`
subclass, its name in KINDS, and its spec class in spec.py.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Kind

KINDS = {"score": "score", "generate": "generate", "judge": "judge"}  # name -> module in this folder


@functools.cache
def get(name: str) -> Kind:
    """The kind called `name` (its module imported on first use)."""
    return importlib.import_module(f".{KINDS[name]}", __name__).KIND
