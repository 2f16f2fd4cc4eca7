"""The interface between the engine and a constrained-decoding library, and the lookup of backends.

The engine sees three things: a `Backend` built once per replica for its tokenizer, a `Matcher` per
constrained sample (fed each sampled token; says whether the output may end here), and `fill`, which writes
the next-token bitmask of many matchers at once into an int32 (rows, ceil(V / 32)) tensor: bit j of word w
allows token 32 w + j. A second library (xgrammar, outlines-core) fits behind the same three without the
engine changing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from .spec import Constraint


class Matcher(Protocol):
    def consume(self, token: int) -> bool:
        """Advance by a sampled token; False if the constraint did not allow it (the matcher is then in
        error, and the sample failed)."""

    def accepting(self) -> bool:
        """The output so far satisfies the constraint: it may end here."""

    def stopped(self) -> bool:
        """Nothing but the end of the output may follow (the mask then allows EOS alone)."""

    def error(self) -> str:
        """Why the matcher failed ('' if it has not)."""

    def fork(self) -> Matcher:
        """An independent copy in the same state (the n samples of a prompt start from one)."""


class Backend(Protocol):
    name: str

    def matcher(self, constraint: Constraint) -> Matcher:
        """A matcher at the start of an output; ValueError naming the problem if the constraint does not
        compile for this tokenizer."""

    def fill(self, matchers: list[Matcher], rows: list[int], bitmask: torch.Tensor) -> None:
        """Write each matcher's next-token mask into row rows[i] of `bitmask` (int32, on the CPU)."""


def check(constraint: Constraint, backend: str = "llguidance") -> None:
    """Compile `constraint` without a tokenizer (before any model loads): ValueError naming what is wrong."""
    backend_class(backend).check(constraint)


def build(name: str, tokenizer, vocab_size: int, eos_id: int) -> Backend:
    """The backend `name` for a replica's tokenizer; bitmasks cover `vocab_size` (the model's padded
    vocabulary: ids past the tokenizer are never allowed)."""
    return backend_class(name)(tokenizer, vocab_size, eos_id)


BACKENDS = ("llguidance",)


def backend_class(name: str):
    """Imported on first use: a job without constraints never imports a constraint library."""
    if name == "llguidance":
        from .llguidance_backend import LLGuidanceBackend

        return LLGuidanceBackend
    raise ValueError(f"unknown constraint backend {name!r}; known: {', '.join(BACKENDS)}")
