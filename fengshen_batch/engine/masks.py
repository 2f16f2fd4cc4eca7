"""Constrained sequences in the engine: their matchers, and token masks filled on a side thread while the
model runs, applied to the raw logits before the repetition penalty, temperature, top-k and top-p.

After step t's tokens are fed to their matchers, `start` hands the continuing sequences to the backend on a
thread of its own (llguidance's executor releases the GIL and fills rows in parallel), and the engine goes on
to schedule and run step t + 1; `apply` waits for that fill only when step t + 1's logits are there. A
sequence's first mask (just prefilled) is filled in `apply` itself.

Masking keeps seeds meaningful: a masked row's remaining logits keep their values, so a sample depends on
the seed, its row and its constraint only, and where the constraint allows the token greedy decoding would
pick, it picks the same token. The backend (and its library) is built with the first constrained request:
an engine that never sees one never imports it.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from ..constraints import build
from .sequence import Request, Sequence

if TYPE_CHECKING:
    from .replica import Replica


class Constraints:
    def __init__(self, replica: Replica, slots: int, backend: str):
        self.replica, self.slots, self.backend_name = replica, slots, backend
        self.backend = None
        self.bits: torch.Tensor | None = (
            None  # (slots, words) int32 on the host: bit j of word w allows 32 w + j
        )
        self._lock = threading.Lock()  # callers' threads may ask for the backend at once (EngineThread)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._ready: set[int] = set()  # ids of the sequences whose row of `bits` is their current mask
        self._verdicts: dict[
            str, str | None
        ] = {}  # a constraint's JSON -> why it cannot run (rows repeat them)
        self.fill_seconds = 0.0  # time `apply` waited for masks (the part not hidden behind the model)

    @property
    def active(self) -> bool:
        return self.backend is not None

    def error(self, constraint) -> str | None:
        """Why `constraint` cannot run with this tokenizer (None: it can), once per distinct constraint;
        builds the backend on first use."""
        key = constraint.model_dump_json()
        if key not in self._verdicts:
            self._verdicts[key] = self._compile_error(constraint)
        return self._verdicts[key]

    def _compile_error(self, constraint) -> str | None:
        with self._lock:
            if self.backend is None:
                r, V = self.replica, self.replica.model.vocab_size
                self.backend = build(self.backend_name, r.tokenizer, V, r.eos_id)
                self.bits = torch.full((self.slots, (V + 31) // 32), -1, dtype=torch.int32)
                # byte -> its 8 bits, lowest first: a row's int32 words viewed as little-endian bytes unpack
                # by one gather into the (V,) allowed tokens (a shift per bit made a (C, words, 32) int32 first)
                byte = torch.arange(256, device=r.model.device)[:, None]
                self.byte_bits = ((byte >> torch.arange(8, device=r.model.device)) & 1).bool()  # (256, 8)
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="fengshen-masks")
        try:
            self.backend.matcher(constraint)
        except ValueError as e:
            return str(e)
        return None

    def start_matchers(self, requests: list[Request]) -> None:
        """Each sample of a just-prefilled constrained prompt gets its own matcher, at the output's start."""
        for r in requests:
            if r.constraint is not None:
                first = self.backend.matcher(r.constraint)
                for i, s in enumerate(r.seqs):
                    s.matcher = first if i == 0 else first.fork()

    def feed(self, seq: Sequence, tok: int, ended: bool) -> bool:
        """Give a constrained sample's matcher its new token; True if the sample ends here: at EOS (judged
        by the state before it), a token the constraint refused (failed), a state where nothing but EOS
        could follow (complete, without spending a step on the EOS), or its token limit (cut)."""
        m = seq.matcher
        if tok == self.replica.eos_id:
            seq.accepting, seq.complete = m.accepting(), True
        elif not m.consume(tok):
            seq.accepting, seq.complete = False, True
        elif m.stopped():
            seq.accepting, seq.complete = m.accepting(), True
        elif ended:
            seq.accepting, seq.complete = m.accepting(), False
        else:
            return False
        seq.matcher = None
        return True

    def start(self, seqs: list[Sequence]) -> None:
        """Fill the next masks of `seqs` (their matchers just took a token) in the background."""
        self.wait()
        self._ready = {id(s) for s in seqs}
        if seqs:
            matchers, rows = [s.matcher for s in seqs], [s.slot for s in seqs]
            self._pending = self._pool.submit(self.backend.fill, matchers, rows, self.bits)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def apply(self, raw: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """`raw` (R, V) logits with the disallowed tokens of constrained rows at -inf (a copy; `raw` itself
        stays the model's, for the NLL). A row whose constraint allows nothing (a failed matcher) gets EOS."""
        rows = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if not rows:
            return raw
        t0 = time.perf_counter()
        self.wait()
        fresh = [seqs[i] for i in rows if id(seqs[i]) not in self._ready]
        if fresh:
            self.backend.fill([s.matcher for s in fresh], [s.slot for s in fresh], self.bits)
        self.fill_seconds += time.perf_counter() - t0
        slots = torch.tensor([seqs[i].slot for i in rows])
        words = self.bits[slots].to(raw.device, non_blocking=True)  # (C, words)
        C, V = len(rows), raw.shape[1]
        allowed = self.byte_bits[words.view(torch.uint8).long()].view(C, -1)[:, :V]  # (C, V)
        if (nothing := (words == 0).all(-1)).any():
            allowed[nothing, self.replica.eos_id] = True
        if len(seqs) == C:  # every row constrained: one pass, out of place
            return torch.where(allowed, raw, -torch.inf)
        index = torch.tensor(rows, device=raw.device)
        out = raw.clone()
        out[index] = torch.where(allowed, raw[index], -torch.inf)
        return out
