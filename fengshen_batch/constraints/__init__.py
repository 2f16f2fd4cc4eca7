"""Constrained generation: what an output must look like (`spec.py`), the backend interface and its lookup
(`backend.py`, llguidance behind it), and the check of finished outputs (`validate.py`)."""

from .backend import BACKENDS, Backend, Matcher, build, check
from .spec import Constraint, row_constraint
from .validate import satisfied

__all__ = ["BACKENDS", "Backend", "Constraint", "Matcher", "build", "check", "row_constraint", "satisfied"]
