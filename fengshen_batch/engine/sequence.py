"""Request and sequence state: what the scheduler and the engine know of each prompt and each sample.

A `Request` is one prompt with its n samples. It is prefilled once (in chunks when long) into the blocks of its
first sample's table, which its other samples hold too (by reference). Each sample is then a `Sequence`
decoding into its own blocks past the prompt until EOS, a stop string or its own token limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Status(Enum):
    WAITING = "waiting"  # queued, no blocks yet
    PREFILLING = "prefilling"  # blocks held, prompt partly in the cache
    RUNNING = "running"  # decoding
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sample: its block table, its row (`slot`: for per-sequence state such as the repetition
    penalty's seen tokens), sampling key and output."""

    request: Request
    index: int  # sample index within the request
    key: int  # sampling key of (seed, row id, sample index)
    slot: int = -1
    table: list[int] = field(default_factory=list)  # KV block of each BLOCK positions, in order
    tokens: list[int] = field(default_factory=list)  # generated ids, the ending one included
    nll: list[float] = field(default_factory=list)  # -log p of each, temperature 1, unwarped
    tail: bytes = b""  # the last bytes of the output, for incremental stop-string checks
    status: Status = Status.WAITING
    matcher: object = None  # constrained: the backend's state of this output (constraints/backend.Matcher)
    # constrained and finished: the output may end where it did (accepting), and it ended because the
    # constraint was done rather than at the token limit (complete)
    accepting: bool | None = None
    complete: bool | None = None

    @property
    def position(self) -> int:
        """Cache position of the next token fed to the model (the last generated one)."""
        return len(self.request.prompt) + len(self.tokens) - 1


@dataclass(eq=False)
class Request:
    """One prompt to continue `len(keys)` times, with its own output limit."""

    ident: object  # the caller's handle for the result (e.g. its input row index)
    prompt: list[int]  # after the too-long policy: len(prompt) + max_new_tokens <= context
    keys: list[int]  # one sampling key per sample
    max_new_tokens: int
    first_index: int = 0  # sample index of keys[0] (a prompt's samples may be split over requests)
    prefilled: int = 0  # prompt tokens already in the cache
    cached: int = 0  # of them, taken from the prefix cache when it was admitted (not computed)
    order: int = -1  # admission order (preemption takes the newest first)
    seqs: list[Sequence] = field(default_factory=list)
    hashes: list[int] | None = None  # the prompt's block hashes (prefix caching), computed once
    constraint: object = None  # what each sample must look like (constraints.Constraint), or None

    def __post_init__(self):
        self.seqs = [Sequence(self, self.first_index + i, k) for i, k in enumerate(self.keys)]

    @property
    def n(self) -> int:
        return len(self.keys)

    @property
    def done(self) -> bool:
        return all(s.status is Status.FINISHED for s in self.seqs)

    def reset(self) -> None:
        """Back to the queue with nothing computed (after a failed step, or preempted; its blocks already
        released): keyed sampling makes a rerun produce the same samples."""
        self.prefilled = self.cached = 0
        for s in self.seqs:
            s.slot, s.table, s.tokens, s.nll, s.tail, s.status = -1, [], [], [], b"", Status.WAITING
            s.matcher = s.accepting = s.complete = None
