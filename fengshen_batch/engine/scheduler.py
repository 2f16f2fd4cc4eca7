"""Which sequences run in the next model step. Plain Python: no tensors, testable without a model.

Each step is either a prefill (prompt chunks within a token budget) or a decode (one token for every running
sequence). A request is admitted when slots for all of its n samples are free; it is prefilled in chunks of
at most the budget, so a long prompt never stalls the running sequences for more than one chunk: while
sequences are running, prefill and decode steps alternate. A sequence that ends frees its slot at once and the
next step can admit a waiting request into it. Slots are handed out lowest first, which keeps the running
sequences packed at the front of the cache, where the decode step reads them.

With prefix caching, an admitted prompt starts its prefill after the longest prefix some slot already holds
(`prefix_cache.PrefixIndex`): a free slot holding it is handed out as it is, else the prefix is copied into
the new slot first; only the rest counts against the token budget.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

from .prefix_cache import PrefixIndex, block_hashes
from .sequence import Request, Sequence, Status


@dataclass(frozen=True)
class Chunk:
    request: Request
    start: int  # prompt[start:end] enters the cache at positions start..end-1
    end: int

    @property
    def completes(self) -> bool:
        return self.end == len(self.request.prompt)


@dataclass(frozen=True)
class PrefillStep:
    chunks: list[Chunk]
    # (from slot, to slot, first position, end position): cached prefixes copied into new slots, done first
    copies: list[tuple[int, int, int, int]] = ()


@dataclass(frozen=True)
class DecodeStep:
    seqs: list[Sequence]  # ordered by slot
    width: int  # slots 0..width-1 are computed (the highest running slot + 1)
    moves: list[tuple[int, int, int]] = ()  # (from slot, to slot, cached positions): compaction, done first


class Scheduler:
    def __init__(self, num_slots: int, token_budget: int, prefix_caching: bool = False):
        if num_slots < 1 or token_budget < 1:
            raise ValueError("the scheduler needs at least one slot and a token budget of at least 1")
        self.num_slots = num_slots
        self.cap = num_slots  # slots that may be in use; lowered after an out-of-memory error
        self.token_budget = token_budget
        self.free = list(range(num_slots))  # a heap: the lowest free slot first
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []  # admitted, prompt not complete, in admission order
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self._last_was_prefill = False
        self.prefix = PrefixIndex(num_slots) if prefix_caching else None

    def add(self, request: Request) -> None:
        if request.n > self.num_slots:
            raise ValueError(f"{request.n} samples per prompt need more than the {self.num_slots} slots")
        self.waiting.append(request)

    @property
    def in_use(self) -> int:
        return self.num_slots - len(self.free)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def _admissible(self, request: Request) -> bool:
        if len(self.free) < request.n:
            return False
        return self.in_use == 0 or self.in_use + request.n <= self.cap

    def schedule(self) -> PrefillStep | DecodeStep | None:
        """The next step, or None when there is nothing to run."""
        if not (self.running and self._last_was_prefill):
            chunks, copies = self._prefill_chunks()
            if chunks:
                self._last_was_prefill = True
                return PrefillStep(chunks, copies)
        self._last_was_prefill = False
        if not self.running:
            return None
        moves = [] if self.waiting and self._admissible(self.waiting[0]) else self._compact()
        seqs = [self.running[s] for s in sorted(self.running)]
        return DecodeStep(seqs, seqs[-1].slot + 1, moves)

    def _compact(self) -> list[tuple[int, int, int]]:
        """Move the highest running sequences down into free slots below them, so that decode computes no
        empty rows. Only when no waiting request would fill those slots next (the tail of the work): a move
        copies a sequence's cached K/V once, an empty row costs a whole row every step."""
        moves = []
        while self.free and self.free[0] < (src := max(self.running)):
            seq = self.running.pop(src)
            seq.slot = heapq.heappushpop(self.free, src)  # the lowest free slot; src becomes free
            self.running[seq.slot] = seq
            moves.append((src, seq.slot, seq.position))
            if self.prefix is not None:
                self.prefix.move(src, seq.slot)
        return moves

    def _prefill_chunks(self) -> tuple[list[Chunk], list[tuple[int, int, int, int]]]:
        budget = self.token_budget
        chunks, copies = [], []
        for req in self.prefilling:
            if budget <= 0:
                return chunks, copies
            end = min(len(req.prompt), req.prefilled + budget)
            chunks.append(Chunk(req, req.prefilled, end))
            budget -= end - req.prefilled
        while budget > 0 and self.waiting and self._admissible(self.waiting[0]):
            req = self.waiting.popleft()
            start = self._admit(req, copies)
            self.prefilling.append(req)
            end = min(len(req.prompt), start + budget)
            chunks.append(Chunk(req, start, end))
            budget -= end - start
        return chunks, copies

    def _admit(self, req: Request, copies: list) -> int:
        """Give the request's samples their slots; return where its prefill starts (0 without a cached
        prefix). A copy of a cached prefix into its first slot is appended to `copies`."""
        start = 0
        if self.prefix is None:
            slots = [heapq.heappop(self.free) for _ in req.seqs]
        else:
            if req.hashes is None:
                req.hashes = block_hashes(req.prompt)
            place = self.prefix.place(req.prompt, req.hashes, self.free)
            self.free.remove(place.slot)
            heapq.heapify(self.free)
            slots = [place.slot] + [heapq.heappop(self.free) for _ in req.seqs[1:]]
            start = kept = place.start
            if place.copy is not None:
                src, kept, end = place.copy
                copies.append((src, place.slot, kept, end))
            self.prefix.take(place.slot, req.prompt, kept)  # its own blocks below `kept` stay valid
            for slot in slots[1:]:
                self.prefix.take(slot, req.prompt, 0)  # rewritten by the sample copy
        for seq, slot in zip(req.seqs, slots, strict=True):
            seq.slot, seq.status = slot, Status.PREFILLING
        req.prefilled = req.cached = start
        return start

    def prefilled(self, step: PrefillStep) -> list[Request]:
        """Record a prefill step; return the requests whose whole prompt is now cached: their samples run."""
        complete = []
        for chunk in step.chunks:
            req = chunk.request
            req.prefilled = chunk.end
            if self.prefix is not None:  # the K/V of prompt[:end] is written (copies done first)
                self.prefix.register(req.seqs[0].slot, req.hashes, chunk.end)
            if chunk.completes:
                self.prefilling.remove(req)
                for seq in req.seqs:
                    seq.status = Status.RUNNING
                    self.running[seq.slot] = seq
                    if self.prefix is not None and seq is not req.seqs[0]:  # its sample copy is done too
                        self.prefix.register(seq.slot, req.hashes, chunk.end)
                complete.append(req)
        return complete

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        del self.running[seq.slot]
        heapq.heappush(self.free, seq.slot)
        if self.prefix is not None:
            self.prefix.release(seq.slot)

    def requeue_all(self, shrink: bool) -> list[Request]:
        """Put every admitted request back at the front of the queue, its slots freed and its progress
        dropped (after a failed step). `shrink`: after out-of-memory, admit half as many sequences."""
        admitted = list(self.prefilling)
        for seq in self.running.values():
            if seq.request not in admitted:
                admitted.append(seq.request)
        if shrink:
            self.cap = max(1, self.in_use // 2)
        if self.prefix is not None:  # what the failed step wrote into them is never read
            for slot in set(range(self.num_slots)) - set(self.free):
                self.prefix.drop(slot)
        for req in reversed(admitted):
            req.reset()
            self.waiting.appendleft(req)
        self.prefilling.clear()
        self.running.clear()
        self.free = list(range(self.num_slots))
        return admitted
