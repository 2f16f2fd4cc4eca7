"""The engine loop: schedule a step, run the model, sample, update the sequences, free what finished.

One engine per replica, built once (the KV cache is allocated here) and fed for the replica's whole life:
`run` drives it from the calling thread (tests, benchmarks, the engine alone); `EngineThread` drives it from
a background thread so that several Ray batches can be in flight in one engine and it never drains.

Bookkeeping per step: one host sync, which brings back the new tokens, their NLLs and the EOS/limit flags
computed on the device. Stop strings are checked on the host against the newly decoded bytes plus the last
(longest stop string - 1) bytes of each output, never by decoding the whole output again.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..params import EngineParams, GenerateParams
from .kv_cache import KVCache, plan_blocks
from .masks import Constraints
from .model_runner import ModelRunner
from .sampler import penalize, sample, sample_full
from .scheduler import DecodeStep, PrefillStep, Scheduler
from .sequence import Request, Sequence
from .stop import StopChecker

if TYPE_CHECKING:  # the engine needs a replica's model, tokenizer and EOS id, not the loading code
    from .replica import Replica

log = logging.getLogger(__name__)

# After a step where most rows' top-p nucleus spilled past the sampler's candidates, this many steps sample
# over the whole vocabulary at once instead of drawing twice; then the candidates are tried again.
FULL_SAMPLING_STEPS = 16


@dataclass
class EngineStats:
    """Counters of the engine's work since it was built (what the benchmark reports)."""

    prefill_steps: int = 0
    decode_steps: int = 0
    prefill_tokens: int = 0  # prompt tokens computed (a requeued prompt's again)
    prompt_tokens: int = 0  # tokens of the prompts whose prefill completed
    cached_tokens: int = 0  # of them, taken from the prefix cache instead of computed
    decode_tokens: int = 0  # tokens produced by decode steps (a sample's first token comes from prefill)
    decode_slots: int = 0  # rows computed by decode steps, running or not
    host_syncs: int = 0
    redraws: int = 0  # rows redrawn by the exact top-p fallback
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    oom_backoffs: int = 0
    preemptions: int = 0  # requests put back in the queue when the KV blocks ran out (changes no output)
    decode_kv_read: int = 0  # K/V positions decode attention read (rows x span, padding included)
    decode_kv_live: int = 0  # of them, the positions the rows hold
    # what a watcher counts while work is in flight (a requeued step's tokens count twice)
    sampled_tokens: int = 0  # tokens appended to samples
    finished_samples: int = 0
    finished_prompts: int = 0  # requests done that hold a prompt's first sample
    mask_wait_seconds: float = 0.0  # constrained rows: time sampling waited for token masks

    @property
    def useful_slot_fraction(self) -> float:
        return self.decode_tokens / self.decode_slots if self.decode_slots else 1.0

    @property
    def kv_read_over_live(self) -> float:
        """K/V decode attention read over the live K/V of its rows (1.0: exactly what the rows hold)."""
        return self.decode_kv_read / self.decode_kv_live if self.decode_kv_live else 1.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def syncs_per_step(self) -> float:
        steps = self.prefill_steps + self.decode_steps
        return self.host_syncs / steps if steps else 0.0

    def as_dict(self) -> dict:
        return {**self.__dict__, "useful_slot_fraction": self.useful_slot_fraction,
                "syncs_per_step": self.syncs_per_step, "prefix_cache_hit_rate": self.prefix_cache_hit_rate,
                "kv_read_over_live": self.kv_read_over_live}  # fmt: skip


class LLMEngine:
    """Continuous batching over one replica with fixed generation parameters."""

    def __init__(
        self,
        replica: Replica,
        params: GenerateParams,
        engine: EngineParams | None = None,
        token_budget: int | None = None,
    ):
        """`token_budget`: prompt tokens prefilled per step (vLLM's max_num_batched_tokens); None: 8192 on
        GPU, 2048 on CPU."""
        engine = engine or EngineParams()
        self.replica, self.params = replica, params
        self.model = replica.model
        m = self.model
        blocks, slots = plan_blocks(
            n_layer=m.n_layer, d_model=m.d, context=m.max_len, dtype=m.dtype, device=m.device,
            max_num_seqs=engine.max_num_seqs, gpu_memory_utilization=engine.gpu_memory_utilization,
            cpu_kv_cache_gb=engine.cpu_kv_cache_gb,
        )  # fmt: skip
        self.cache = KVCache(m.n_layer, blocks, m.n_head, m.head_dim, m.dtype, m.device)
        self.runner = ModelRunner(m, self.cache, slots, cuda_graphs=engine.cuda_graphs)
        budget = token_budget or (8192 if m.device.type == "cuda" else 2048)
        self.scheduler = Scheduler(blocks, slots, budget, prefix_caching=engine.enable_prefix_caching)
        self.stop = StopChecker(replica.tokenizer, params.stop, m.vocab_size) if params.stop else None
        # (rows, V) bool: tokens of each sequence's prompt and output (by its row), for the repetition penalty.
        self.seen = (
            torch.zeros(slots, m.vocab_size, dtype=torch.bool, device=m.device)
            if params.repetition_penalty != 1.0
            else None
        )
        self.stats = EngineStats()
        self.constraints = Constraints(replica, slots, engine.constraint_backend)  # masks, matchers
        self._full_steps = 0  # steps left to sample over the full vocabulary (see FULL_SAMPLING_STEPS)
        log.info("engine: up to %d sequences, %d KV blocks (%.2f GiB), %d-token step budget, prefix caching %s",
                 slots, blocks - 1, self.cache.nbytes / 2**30, budget,
                 "on" if engine.enable_prefix_caching else "off")  # fmt: skip

    @property
    def max_num_seqs(self) -> int:
        return self.scheduler.num_slots

    def check(self, request: Request) -> None:
        """Refuse a request the engine could never run (the caller's preparation should prevent it)."""
        if not request.prompt or request.max_new_tokens < 1:
            raise ValueError("a request needs a prompt token and max_new_tokens >= 1")
        if len(request.prompt) + request.max_new_tokens > self.model.max_len:
            raise ValueError(
                f"prompt ({len(request.prompt)}) + max_new_tokens ({request.max_new_tokens}) exceeds the "
                f"context of {self.model.max_len}"
            )
        if request.n > self.scheduler.num_slots:
            raise ValueError(f"{request.n} samples per prompt exceed max_num_seqs={self.scheduler.num_slots}")
        if request.constraint is not None:
            error = self.constraint_error(request.constraint)
            if error:
                raise ValueError(error)
        if not self.scheduler.fits_alone(request):
            raise ValueError(
                f"{request.n} samples of {len(request.prompt)} + {request.max_new_tokens} tokens need more KV "
                "cache than the engine has: raise gpu_memory_utilization or cpu_kv_cache_gb"
            )

    def constraint_error(self, constraint) -> str | None:
        """Why `constraint` cannot run with this replica's tokenizer (None: it can)."""
        return self.constraints.error(constraint)

    def add(self, *requests: Request) -> None:
        """Queue requests, all or none: every one is checked before any is queued."""
        for r in requests:
            self.check(r)
        for r in requests:
            self.scheduler.add(r)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Run one step; return the requests that finished in it."""
        plan = self.scheduler.schedule()
        self.stats.preemptions = self.scheduler.preemptions
        if plan is None:
            return []
        try:
            return self._run(plan)
        except torch.OutOfMemoryError:
            if self.scheduler.cap == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.scheduler.requeue_all(shrink=True)
            self.stats.oom_backoffs += 1
            log.warning("out of memory: admitting at most %d sequences", self.scheduler.cap)
            return []

    def _run(self, plan: PrefillStep | DecodeStep) -> list[Request]:
        start = time.perf_counter()
        if isinstance(plan, PrefillStep):
            logits = self.runner.prefill(plan)
            done = self.scheduler.prefilled(plan)
            self.stats.prompt_tokens += sum(len(r.prompt) for r in done)
            self.stats.cached_tokens += sum(r.cached for r in done)
            seqs = [s for r in done for s in r.seqs]
            self.constraints.start_matchers(done)
            if seqs:
                counts = torch.tensor([r.n for r in done], device=logits.device)
                logits = logits.repeat_interleave(counts, dim=0)  # (R, V): one row per sample
                if self.seen is not None:
                    self._init_seen(done)
            finished = self._advance(seqs, logits)
            self.stats.prefill_steps += 1
            self.stats.prefill_tokens += sum(c.end - c.start for c in plan.chunks)
            self.stats.prefill_seconds += time.perf_counter() - start
            return finished
        logits = self.runner.decode(plan)
        self.stats.decode_kv_read += self.runner.last_kv[0]
        self.stats.decode_kv_live += self.runner.last_kv[1]
        finished = self._advance(plan.seqs, logits)
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(plan.seqs)
        self.stats.decode_slots += len(plan.seqs)
        self.stats.decode_seconds += time.perf_counter() - start
        return finished

    def _init_seen(self, requests: list[Request]) -> None:
        for r in requests:
            slots = torch.tensor([s.slot for s in r.seqs], device=self.seen.device)
            self.seen[slots] = False
            self.seen[slots[:, None], torch.tensor(r.prompt, device=self.seen.device)] = True

    def _advance(self, seqs: list[Sequence], raw: torch.Tensor) -> list[Request]:
        """Sample one token for each of `seqs` from its raw logits (R, V); update them; free finished ones."""
        if not seqs:
            return []
        p = self.params
        dev = raw.device
        meta = torch.tensor(
            [[s.key for s in seqs], [len(s.tokens) for s in seqs], [s.request.max_new_tokens for s in seqs],
             [s.slot for s in seqs]], dtype=torch.long,
        ).to(dev, non_blocking=True)  # fmt: skip
        keys, steps, limits, slots = meta
        masked = self.constraints.apply(raw, seqs)  # constrained rows: their allowed tokens only
        logits = penalize(masked, None if self.seen is None else self.seen[slots], p.repetition_penalty)
        tokens, redraw = sample(logits, keys, steps, p, full=self._full_steps > 0)
        self._full_steps = max(0, self._full_steps - 1)
        logprobs = raw.log_softmax(-1)  # (R, V) at temperature 1, unwarped: for the NLL
        host = self._flags(logprobs, tokens, steps, limits, redraw).cpu()  # the step's one host sync
        self.stats.host_syncs += 1
        if redraw is not None and bool(host[3].any()):
            rows = host[3].nonzero().squeeze(1).to(dev)
            tokens[rows] = sample_full(logits[rows], keys[rows], steps[rows], p)
            host = self._flags(logprobs, tokens, steps, limits, None).cpu()
            self.stats.host_syncs += 1
            self.stats.redraws += len(rows)
            if 2 * len(rows) > len(seqs):  # mostly flat: sample the full way for a while, then look again
                self._full_steps = FULL_SAMPLING_STEPS
        if self.seen is not None:
            self.seen[slots, tokens] = True
        toks, nlls, ends = host[0].long().tolist(), host[1].tolist(), host[2].bool().tolist()
        self.stats.sampled_tokens += len(seqs)
        finished, constrained = [], []
        for seq, tok, nll, end in zip(seqs, toks, nlls, ends, strict=True):
            seq.tokens.append(tok)
            seq.nll.append(nll)
            if seq.matcher is not None:  # the constraint decides where the output ends; stop strings do not
                end = self.constraints.feed(seq, tok, end)
                if not end:
                    constrained.append(seq)
            elif self.stop is not None and not end:
                end = self.stop.update(seq, tok)
            if end:
                self.scheduler.finish(seq)
                self.stats.finished_samples += 1
                if seq.request.done:
                    finished.append(seq.request)
                    self.stats.finished_prompts += seq.request.first_index == 0
        if self.constraints.active:
            self.stats.mask_wait_seconds = self.constraints.fill_seconds
            self.constraints.start(constrained)  # their next masks fill while the next step runs
        return finished

    def _flags(self, logprobs, tokens, steps, limits, redraw) -> torch.Tensor:
        """(4, R) float64 on the device: token, its NLL (temperature 1, unwarped), ended (EOS or limit),
        needs a redraw."""
        nll = -logprobs.gather(1, tokens[:, None]).squeeze(1)
        ended = steps + 1 >= limits
        if not self.params.ignore_eos:
            ended |= tokens == self.replica.eos_id
        flags = [tokens.double(), nll.double(), ended.double()]
        flags.append(redraw.double() if redraw is not None else torch.zeros_like(flags[0]))
        return torch.stack(flags)

    def run(self, requests: list[Request]) -> None:
        """Generate every request to completion from this thread."""
        self.add(*requests)
        try:
            while not all(r.done for r in requests):
                self.step()
        except BaseException:
            self.reset()
            raise

    def reset(self) -> None:
        """Drop every request (after a failed step): the engine is empty and ready again."""
        self.constraints.wait()
        self.scheduler.requeue_all(shrink=False)
        self.scheduler.waiting.clear()


class EngineThread:
    """Drives one engine from a background thread; callers from several threads `submit` and wait.

    A Ray actor with several calls in flight feeds one engine: while one batch's sequences decode, the next
    batch's prompts queue up and are admitted as sequences finish, so the replica never drains between batches.
    A step that fails (other than out-of-memory, which the engine absorbs) fails every request in the
    engine; their callers retry row by row.
    """

    def __init__(self, engine: LLMEngine, threads: int | None = None):
        self.engine = engine
        self._lock = threading.Condition()
        self._pending: list[tuple[list[Request], Future]] = []
        self._inflight: list[tuple[list[Request], Future]] = []
        self._closed = False
        self._threads = threads  # CPU: intra-op threads of this thread's compute
        self._thread = threading.Thread(target=self._loop, name="fengshen-engine", daemon=True)
        self._thread.start()

    def submit(self, requests: list[Request]) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine thread is closed")
            self._pending.append((requests, fut))
            self._lock.notify()
        return fut

    def run(self, requests: list[Request]) -> None:
        """Generate `requests` to completion (blocks this caller only; other callers' requests run beside)."""
        self.submit(requests).result()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()

    def _loop(self) -> None:
        engine = self.engine
        if self._threads:  # this thread's own OpenMP team does the compute (see workers/actors.load_replicas)
            torch.set_num_threads(self._threads)
        while True:
            with self._lock:
                while not self._pending and not engine.has_work() and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                batches, self._pending = self._pending, []
            for requests, fut in batches:
                try:
                    engine.add(*requests)
                except Exception as e:
                    fut.set_exception(e)
                    continue
                self._inflight.append((requests, fut))
            try:
                engine.step()
            except BaseException as e:  # noqa: BLE001 - handed to every waiting caller
                engine.reset()
                for _, fut in self._inflight:
                    fut.set_exception(e)
                self._inflight = []
                continue
            still = []
            for requests, fut in self._inflight:
                if all(r.done for r in requests):
                    fut.set_result(requests)
                else:
                    still.append((requests, fut))
            self._inflight = still
