"""Which sequences run in the next model step. Plain Python: no tensors, testable without a model.

Each step is either a prefill (prompt chunks within a token budget) or a decode (one token for every running
sequence). A request is admitted when rows for its n samples are free (`max_num_seqs` caps them) and the KV
blocks of its prompt can be had (`block_manager.BlockManager`): with prefix caching, the blocks of the longest
cached prefix are taken by reference and the prefill starts after them. A prompt whose next block another
admitted prompt is computing waits for a later step and finds it there (a shared header is computed once,
not once per request admitted beside it); requests behind it are admitted past it. A prompt is prefilled in
chunks of at most the budget, so a long prompt never stalls the running sequences for more than one chunk:
while sequences are running, prefill and decode steps alternate. A sequence that ends releases its blocks at once.

Before a decode, every running sequence gets room for its next token (a fresh block, or its own copy of a
block its prompt's other samples share). When no block is free, the newest request is preempted: its blocks
released and the request put back at the front of the queue, from scratch (keyed sampling and batch-invariant
steps make its rerun produce the same samples), as nano-vllm and vLLM preempt.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager, block_hashes, blocks_for, cacheable_blocks
from .kv_cache import BLOCK
from .sequence import Request, Sequence, Status

# Requests passed over in one step because their next prompt block is being computed beside them, at most:
# past this many the step takes no more (a long run of one header waits for it rather than being scanned).
LOOKAHEAD = 64


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


@dataclass(frozen=True)
class DecodeStep:
    seqs: list[Sequence]  # by row
    copies: list[tuple[int, int]] = field(
        default_factory=list
    )  # (from block, to block): copies on write, first


class Scheduler:
    def __init__(self, num_blocks: int, max_seqs: int, token_budget: int, prefix_caching: bool = False):
        if max_seqs < 1 or token_budget < 1:
            raise ValueError("the scheduler needs at least one sequence and a token budget of at least 1")
        self.blocks = BlockManager(num_blocks, prefix_caching)
        self.num_slots = max_seqs  # rows: sequences that may run at once
        self.cap = max_seqs  # lowered after an out-of-memory error
        self.token_budget = token_budget
        self.free = list(range(max_seqs))  # a heap of free rows, the lowest first
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []  # admitted, prompt not complete, in admission order
        self.running: dict[int, Sequence] = {}  # row -> sequence
        self.preemptions = 0
        self._admitted = 0
        self._last_was_prefill = False

    def fits_alone(self, request: Request) -> bool:
        """Whether the request could run with nothing beside it: every sample to its limit."""
        whole = blocks_for(len(request.prompt) + request.max_new_tokens)
        return request.n <= self.num_slots and request.n * whole <= self.blocks.num_blocks - 1

    def add(self, request: Request) -> None:
        if not self.fits_alone(request):
            raise ValueError(
                f"{request.n} samples of {len(request.prompt)} + {request.max_new_tokens} tokens need more than "
                f"the engine's {self.num_slots} sequences or {self.blocks.num_blocks - 1} KV blocks"
            )
        self.waiting.append(request)

    @property
    def in_use(self) -> int:
        return self.num_slots - len(self.free)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def schedule(self) -> PrefillStep | DecodeStep | None:
        """The next step, or None when there is nothing to run."""
        if not (self.running and self._last_was_prefill):
            chunks = self._prefill_chunks()
            if chunks:
                self._last_was_prefill = True
                return PrefillStep(chunks)
        self._last_was_prefill = False
        if not self.running:
            return None
        copies = self._make_room()
        if not self.running:  # everything was preempted back into the queue
            return self.schedule()
        return DecodeStep([self.running[s] for s in sorted(self.running)], copies)

    def _make_room(self) -> list[tuple[int, int]]:
        """Room for each running sequence's next token, oldest request first; preempt the newest when the
        blocks run out."""
        copies = []
        for seq in sorted(self.running.values(), key=lambda s: (s.request.order, s.index)):
            if seq.status is not Status.RUNNING:  # preempted by an earlier turn of this loop
                continue
            while (room := self.blocks.append(seq.table, seq.position)) is None:
                self._preempt_newest()
                if seq.status is not Status.RUNNING:
                    break
            if isinstance(room, tuple):
                copies.append(room)
        return copies

    def _preempt_newest(self) -> None:
        """The newest admitted request (running or prefilling) back to the front of the queue."""
        newest = max([*(s.request for s in self.running.values()), *self.prefilling], key=lambda r: r.order)
        if newest in self.prefilling:
            self.prefilling.remove(newest)
        for seq in newest.seqs:
            if seq.status in (Status.RUNNING, Status.PREFILLING):
                self.running.pop(seq.slot, None)
                heapq.heappush(self.free, seq.slot)
            self.blocks.release(seq.table)
        newest.reset()
        self.waiting.appendleft(newest)
        self.preemptions += 1

    def _prefill_chunks(self) -> list[Chunk]:
        budget = self.token_budget
        chunks = []
        # hashes of the full prompt blocks that admitted prompts are yet to write: a prompt whose next block
        # is one of them waits a step and then finds it, instead of computing the same K/V beside it
        pending: set[int] = set()
        for req in self.prefilling:
            pending.update(req.hashes[req.prefilled // BLOCK : len(req.prompt) // BLOCK])
            if budget <= 0:
                return chunks
            end = min(len(req.prompt), req.prefilled + budget)
            chunks.append(Chunk(req, req.prefilled, end))
            budget -= end - req.prefilled
        waiting_for_blocks: list[Request] = []
        while budget > 0 and self.waiting and len(waiting_for_blocks) < LOOKAHEAD:
            start = self._admit(self.waiting[0], pending)
            if start is None:
                break
            req = self.waiting.popleft()
            if start < 0:  # its next block is being computed: admitted in a later step, where it is found
                waiting_for_blocks.append(req)
                continue
            self.prefilling.append(req)
            pending.update(req.hashes[start // BLOCK : len(req.prompt) // BLOCK])
            end = min(len(req.prompt), start + budget)
            chunks.append(Chunk(req, start, end))
            budget -= end - start
        self.waiting.extendleft(reversed(waiting_for_blocks))  # first in line again, in their order
        return chunks

    def _admit(self, req: Request, pending: set[int]) -> int | None:
        """Rows and blocks for the request's samples, if they can be had; returns where its prefill starts
        (after its cached prefix), None to keep it waiting, or -1 when the next block of its prompt is one
        an admitted prompt is computing (`pending`)."""
        if len(self.free) < req.n or (self.in_use and self.in_use + req.n > self.cap):
            return None
        if req.hashes is None:
            req.hashes = block_hashes(req.prompt) if self.blocks.prefix_caching else []
        cached = self.blocks.cached(req.prompt, req.hashes)
        if (
            self.blocks.prefix_caching
            and len(cached) < cacheable_blocks(len(req.prompt))
            and req.hashes[len(cached)] in pending
        ):
            return -1
        new = blocks_for(len(req.prompt)) - len(cached)
        # room for the prompt, and (beside other work) for each sample's first block past it or its copy
        # of the last one; alone, a request that fits (`fits_alone`) is always admitted
        if not self.blocks.can_allocate(cached, new + (req.n if self.in_use else 0)):
            return None
        table = self.blocks.allocate(cached, new, holders=req.n)
        for seq in req.seqs:
            seq.slot, seq.table, seq.status = heapq.heappop(self.free), list(table), Status.PREFILLING
        req.prefilled = req.cached = len(cached) * BLOCK
        req.order, self._admitted = self._admitted, self._admitted + 1
        return req.prefilled

    def prefilled(self, step: PrefillStep) -> list[Request]:
        """Record a prefill step; return the requests whose whole prompt is now cached: their samples run."""
        complete = []
        for chunk in step.chunks:
            req = chunk.request
            req.prefilled = chunk.end
            self.blocks.register(req.seqs[0].table, req.prompt, req.hashes, chunk.end)
            if chunk.completes:
                self.prefilling.remove(req)
                for seq in req.seqs:
                    seq.status = Status.RUNNING
                    self.running[seq.slot] = seq
                complete.append(req)
        return complete

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        del self.running[seq.slot]
        heapq.heappush(self.free, seq.slot)
        self.blocks.release(seq.table)

    def requeue_all(self, shrink: bool) -> list[Request]:
        """Put every admitted request back at the front of the queue, its blocks released and its progress
        dropped (after a failed step). `shrink`: after out-of-memory, admit half as many sequences. What the
        failed step wrote is never read: it wrote only blocks that are not registered."""
        admitted = list(self.prefilling)
        for seq in self.running.values():
            if seq.request not in admitted:
                admitted.append(seq.request)
        if shrink:
            self.cap = max(1, self.in_use // 2)
        for req in admitted:
            for seq in req.seqs:
                if seq.status is not Status.FINISHED:
                    self.blocks.release(seq.table)
        for req in sorted(admitted, key=lambda r: r.order, reverse=True):
            req.reset()
            self.waiting.appendleft(req)
        self.prefilling.clear()
        self.running.clear()
        self.free = list(range(self.num_slots))
        return admitted
