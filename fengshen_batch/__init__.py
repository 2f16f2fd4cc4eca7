"""fengshen-batch: offline batch scoring and generation for the Fengshenbang GPT2-3.5B models on Ray.

The public API (README, "From Python"): job specs (`ScoreJob`, `GenerateJob`, `JudgeJob`, `load_spec`,
`build_spec`); `run` and its `JobResult`, `submit` to a cluster and its `Submission`, `report` (rebuild a
score job's report); the Ray Data processors `score`, `generate` and `judge`; the errors (`FengshenError` and
its kinds). Names load on first use, so `import fengshen_batch` imports neither torch nor Ray.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ScoreJob": "spec",
    "GenerateJob": "spec",
    "JudgeJob": "spec",
    "load_spec": "spec",
    "build_spec": "spec",
    "run": "api",
    "JobResult": "api",
    "submit": "api",
    "Submission": "api",
    "report": "api",
    "head": "api",
    "plan": "api",
    "score": "processors",
    "generate": "processors",
    "judge": "processors",
    "FengshenError": "errors",
    "SpecError": "errors",
    "InputError": "errors",
    "ModelLoadError": "errors",
    "JobError": "errors",
    "SubmitError": "errors",
    "JobInterrupted": "errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fengshen_batch' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
