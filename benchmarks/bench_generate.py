"""Generation on a realistic mix of prompt and output lengths: our engine against HF's ways (a benchmark, never a test).

    python benchmarks/bench_generate.py --device cuda            # GPT2-3.5B shape, random weights, bf16
    python benchmarks/bench_generate.py --device cpu             # the small config in float32 (~5 min on 2 cores)
    python benchmarks/bench_generate.py --device cpu --quick     # a smoke test (< 60 s)
    python benchmarks/bench_generate.py --sampler-only           # the sampler's share of a 3.5B decode step

Workloads (the same rows for every system; random token ids 1..vocab-1 as prompts, EOS id 0 not ignored,
sampling at temperature 0.8 and top-p 0.95):
    mixed   prompt lengths log-uniform, per-row output limits uniform (a random-weight model never emits EOS
            on purpose, so per-row limits stand in for outputs ending at realistic points);
    fixed   one prompt length and one limit for every row, as a reference.

Systems:
    ours           `generate_tokens(..., max_new_tokens=limits, engine=LLMEngine(...))` at several max_num_seqs;
    hf_static      HF `model.generate` on left-padded batches sorted by prompt length, each batch generating its
                   largest limit (HF has no per-row limit), best of three batch sizes; only min(limit, produced)
                   tokens of each row count as useful output;
    hf_cb          HF `generate_batch` (transformers' continuous batching) with max_new_tokens = the largest
                   limit (it takes one limit for all), useful and raw produced tokens/s;
    hf_cb_per_row  the same manager fed request by request with each row's own limit (`add_request` takes one);
    seed           the model card's usage: one prompt at a time, `model.generate(do_sample=True, ...)`.

Every system is warmed up once on a few short rows before it is timed (ours on CUDA: on max_num_seqs rows, so
that most of its lazily captured decode graphs exist before the timed run). Writes
benchmarks/results/generate-<device>-<yyyymmdd>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import CPU_SMALL, GPT2_35B, _peak_gb, build, sync  # noqa: E402
from fengshen_batch.engine.llm_engine import EngineStats, LLMEngine  # noqa: E402
from fengshen_batch.kinds.generation import generate_tokens  # noqa: E402
from fengshen_batch.kinds.rows import RowError  # noqa: E402
from fengshen_batch.params import EngineParams, GenerateParams  # noqa: E402

TEMPERATURE, TOP_P, EOS = 0.8, 0.95, 0
# HF fills an unset top_k with 50 (GenerationConfig._get_default_generation_params): top_k=0 turns it off, so
# that every system samples the same distribution (top-p only). With top-k 50 HF's top-p sorts a vocabulary of
# -inf but 50 entries, which is faster than the real thing.
HF_SAMPLING = dict(do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=0)
WARMUP_ROWS, WARMUP_TOKENS = 4, 8  # each system's warm-up: a few rows, a few new tokens each


# ----------------------------------------------------------------------------------------------- workloads


def plan(device: torch.device, quick: bool) -> dict:
    """Sizes of everything per device; `quick` shrinks them for a smoke test."""
    if device.type == "cuda":
        p = dict(cfg=GPT2_35B, dtype="bfloat16", mixed_rows=1024, prompt_range=(16, 512), limit_range=(32, 512),
                 fixed=(128, 128), fixed_rows=1024, max_num_seqs=[128, 256], hf_batch_sizes=[32, 64, 128],
                 cb_rows=256, seed_rows=32)  # fmt: skip
        if quick:
            p.update(mixed_rows=128, fixed_rows=128, max_num_seqs=[128], hf_batch_sizes=[64], cb_rows=64,
                     seed_rows=4)  # fmt: skip
        return p
    cfg = dict(CPU_SMALL)  # n_positions=256: prompts 16..128 and limits 8..128 keep prompt + limit <= 256
    # HF continuous batching pays ~8 s of start-up per call here (it fills static attention-mask buffers) and
    # then runs at a few hundred tok/s, so it gets the first 32 rows; the fixed reference has 128 rows.
    # Both keep the full run near 6 minutes.
    p = dict(cfg=cfg, dtype="float32", mixed_rows=512, prompt_range=(16, 128), limit_range=(8, 128),
             fixed=(32, 32), fixed_rows=128, max_num_seqs=[32, 64, 128], hf_batch_sizes=[16, 32, 64],
             cb_rows=32, seed_rows=16)  # fmt: skip
    if quick:
        # each HF continuous-batching call costs ~8 s of start-up here (see hf_cb's startup_s): one call only
        p.update(mixed_rows=48, limit_range=(8, 64), fixed_rows=32, max_num_seqs=[32], hf_batch_sizes=[32],
                 cb_rows=4, seed_rows=4, skip=["hf_cb_per_row"], fixed_systems=["ours", "hf_static"])  # fmt: skip
    return p


def workload(rng, cfg: dict, rows: int, prompt_range, limit_range) -> dict:
    """`rows` prompts with log-uniform lengths in prompt_range and uniform limits in limit_range (inclusive);
    equal ends give fixed lengths."""
    lo, hi = prompt_range
    if lo == hi:
        lengths = np.full(rows, lo)
    else:
        lengths = np.floor(np.exp(rng.uniform(math.log(lo), math.log(hi + 1), rows))).astype(int).clip(lo, hi)
    limits = rng.integers(limit_range[0], limit_range[1] + 1, rows)
    assert (lengths + limits <= cfg["n_positions"]).all()
    prompts = [rng.integers(1, cfg["vocab_size"], size=int(n)).tolist() for n in lengths]
    return {"prompts": prompts, "limits": [int(x) for x in limits]}


def describe(w: dict) -> dict:
    lengths, limits = np.array([len(p) for p in w["prompts"]]), np.array(w["limits"])
    return {"rows": len(limits), "prompt_tokens": int(lengths.sum()), "limit_tokens": int(limits.sum()),
            "prompt_len": {"min": int(lengths.min()), "median": float(np.median(lengths)), "max": int(lengths.max())},
            "limit": {"min": int(limits.min()), "median": float(np.median(limits)), "max": int(limits.max())}}  # fmt: skip


def subset(w: dict, n: int | None) -> dict:
    return w if n is None or n >= len(w["limits"]) else {k: v[:n] for k, v in w.items()}


def warmup_rows(w: dict, n: int = WARMUP_ROWS, tokens: int | None = WARMUP_TOKENS) -> dict:
    """The first n rows, their limits capped at `tokens` (None: their own limits)."""
    s = subset(w, n)
    return {"prompts": s["prompts"], "limits": [min(x, tokens or x) for x in s["limits"]]}


def _reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


class Meter:
    """Wall and process CPU time of a timed section, and the machine's 1-minute load around it (others' work on
    a shared CPU slows every system here, OpenMP threads most of all: the load says how much to trust it)."""

    def __init__(self, device):
        self.device = device
        sync(device)
        _reset_peak(device)
        self.load = os.getloadavg()[0]
        self.cpu = time.process_time()
        self.start = time.perf_counter()

    def stop(self) -> dict:
        sync(self.device)
        wall = time.perf_counter() - self.start
        return {"wall_s": wall, "cpu_s": time.process_time() - self.cpu, "load_1m_before": self.load,
                "load_1m_after": os.getloadavg()[0], "peak_gb": _peak_gb(self.device)}  # fmt: skip


def _error(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}


# ----------------------------------------------------------------------------------------------- systems


def gen_params(w: dict, seed: int = 0) -> GenerateParams:
    return GenerateParams(temperature=TEMPERATURE, top_p=TOP_P, max_new_tokens=max(w["limits"]), seed=seed)


def run_ours(
    replica, w: dict, max_num_seqs: int, device, prefix_caching: bool = True, warm: dict | None = None
) -> dict:
    """One engine per max_num_seqs (the KV cache is allocated once), warmed up (on `warm` when given: rows
    that share no prefix with the workload keep its cache cold), then the whole workload."""
    params = gen_params(w)
    engine = LLMEngine(
        replica, params, EngineParams(max_num_seqs=max_num_seqs, enable_prefix_caching=prefix_caching)
    )
    # On CUDA the decode graphs are captured lazily per (batch, span) bucket: warm up on max_num_seqs rows at
    # their own limits so that most captures happen before the timed run (on CPU a few short rows suffice).
    if warm is None:
        warm = warmup_rows(w, max_num_seqs, None) if device.type == "cuda" else warmup_rows(w)
    generate_tokens(replica, warm["prompts"], [f"w{i}" for i in range(len(warm["limits"]))], params,
                    max_new_tokens=warm["limits"], engine=engine)  # fmt: skip
    engine.stats = EngineStats()  # count the timed run only
    meter = Meter(device)
    out = generate_tokens(replica, w["prompts"], [str(i) for i in range(len(w["limits"]))], params,
                          max_new_tokens=w["limits"], engine=engine)  # fmt: skip
    m = meter.stop()
    wall = m["wall_s"]
    errors = [(i, r) for i, r in enumerate(out) if isinstance(r, RowError)]
    samples = [r[0] for r in out if not isinstance(r, RowError)]
    produced = sum(s.generated_tokens for s in samples)
    over = [
        i for i, r in enumerate(out) if not isinstance(r, RowError) and r[0].generated_tokens > w["limits"][i]
    ]
    short = [i for i, r in enumerate(out) if not isinstance(r, RowError) and r[0].finish_reason == "length"
             and r[0].generated_tokens != w["limits"][i]]  # fmt: skip
    st = engine.stats
    res = {
        "rows": len(w["limits"]), "max_num_seqs": max_num_seqs, "slots_allocated": engine.max_num_seqs,
        "prefix_caching": prefix_caching, **m,
        "output_tokens": produced, "output_tokens_per_s": produced / wall,
        "prefill_tokens_per_s": st.prefill_tokens / st.prefill_seconds if st.prefill_seconds else None,
        "decode_tokens_per_s": st.decode_tokens / st.decode_seconds if st.decode_seconds else None,
        "useful_slot_fraction": st.useful_slot_fraction, "syncs_per_step": st.syncs_per_step,
        "other_seconds": wall - st.prefill_seconds - st.decode_seconds,
        "finish_reasons": {k: sum(s.finish_reason == k for s in samples) for k in ("stop", "length")},
        "row_errors": [f"{i}: {r.kind}: {r.message}" for i, r in errors[:5]], "n_row_errors": len(errors),
        "rows_over_limit": over[:10], "rows_length_but_not_at_limit": short[:10],
        "kv_cache_gb": engine.cache.nbytes / 2**30, "stats": st.as_dict(),
        # each row's tokens and logprobs, for comparing systems' outputs (callers pop it before saving)
        "samples": [None if isinstance(r, RowError) else [(s.token_ids, s.token_logprobs) for s in r] for r in out],
    }  # fmt: skip
    del engine
    gc.collect()  # the KV cache goes before the next system allocates its own
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def _first_eos_len(row: list[int], cap: int) -> int:
    """Tokens HF produced for a row: up to and including the first EOS, else all of them."""
    try:
        return row.index(EOS) + 1
    except ValueError:
        return cap


def _hf_static_pass(model, w: dict, batch_size: int, device, timed: bool = True) -> dict:
    order = sorted(range(len(w["limits"])), key=lambda i: len(w["prompts"][i]))
    useful = produced = slots = 0
    meter = Meter(device)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        longest = max(len(w["prompts"][i]) for i in idx)
        new = max(w["limits"][i] for i in idx)
        ids = torch.zeros(len(idx), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):  # left padding
            p = w["prompts"][i]
            ids[r, longest - len(p) :] = torch.tensor(p)
            mask[r, longest - len(p) :] = 1
        with torch.inference_mode():
            out = model.generate(ids.to(device), attention_mask=mask.to(device), **HF_SAMPLING, max_new_tokens=new,
                                 pad_token_id=EOS, eos_token_id=EOS)  # fmt: skip
        gen = out[:, longest:].tolist()
        for r, i in enumerate(idx):
            n = _first_eos_len(gen[r], len(gen[r]))
            produced += n
            useful += min(n, w["limits"][i])
        slots += len(idx) * new
    m = meter.stop()
    wall = m["wall_s"]
    return {"batch_size": batch_size, **m, "useful_tokens": useful, "produced_tokens": produced,
            "useful_tokens_per_s": useful / wall, "raw_tokens_per_s": produced / wall,
            "useful_slot_fraction": useful / slots}  # fmt: skip


def run_hf_static(model, w: dict, batch_sizes: list[int], device) -> dict:
    _hf_static_pass(model, warmup_rows(w), WARMUP_ROWS, device)  # warm-up
    per = {}
    for bs in batch_sizes:
        try:
            per[bs] = _hf_static_pass(model, w, bs, device)
        except Exception as e:  # noqa: BLE001 - recorded, the benchmark goes on
            per[bs] = _error(e)
        print(f"  hf_static bs={bs}: {per[bs].get('useful_tokens_per_s', per[bs].get('error'))}", flush=True)
    ok = {k: v for k, v in per.items() if "error" not in v}
    if not ok:
        return {"error": "every batch size failed", "per_batch_size": per}
    best = max(ok, key=lambda k: ok[k]["useful_tokens_per_s"])
    return {**ok[best], "best_batch_size": best, "per_batch_size": per}


def _cb_config(w: dict):
    from transformers import GenerationConfig

    return GenerationConfig(
        **HF_SAMPLING, max_new_tokens=max(w["limits"]), eos_token_id=EOS, pad_token_id=EOS
    )


def _cb_tally(w: dict, outputs: list, m: dict) -> dict:
    """Useful and raw tokens/s over the whole call (what a user waits for), and over the generation window
    (first request admitted to last finished, from the outputs' lifespans): the difference is the manager's
    start-up (on CPU, filling its static attention-mask buffers) and shutdown."""
    wall = m["wall_s"]
    spans = [o.lifespan for o in outputs if o is not None and getattr(o, "lifespan", (-1, -1))[0] > 0]
    window = max(s[1] for s in spans) - min(s[0] for s in spans) if spans else None
    useful = produced = failed = 0
    errors = []
    for i, o in enumerate(outputs):
        if o is None or getattr(o, "error", None):
            failed += 1
            errors.append(None if o is None else o.error)
            continue
        n = len(o.generated_tokens)
        produced += n
        useful += min(n, w["limits"][i])
    return {"rows": len(w["limits"]), **m, "useful_tokens": useful, "produced_tokens": produced,
            "useful_tokens_per_s": useful / wall, "raw_tokens_per_s": produced / wall, "failed_rows": failed,
            "errors": errors[:3], "generation_window_s": window,
            "startup_and_shutdown_s": wall - window if window else None,
            "useful_tokens_per_s_in_window": useful / window if window else None}  # fmt: skip


def run_hf_cb(model, w: dict, device) -> dict:
    """`generate_batch`: one max_new_tokens for all rows, the largest limit."""
    gen_cfg = _cb_config(w)
    model.generate_batch(warmup_rows(w)["prompts"], generation_config=gen_cfg, max_new_tokens=WARMUP_TOKENS)
    meter = Meter(device)
    out = model.generate_batch(w["prompts"], generation_config=gen_cfg, max_new_tokens=max(w["limits"]))
    m = meter.stop()
    ordered = list(out.values())  # generate_batch returns results in input order
    return {**_cb_tally(w, ordered, m), "max_new_tokens": max(w["limits"])}


def run_hf_cb_per_row(model, w: dict, device) -> dict:
    """The manager behind `generate_batch`, fed with each row's own limit (`add_request(max_new_tokens=...)`)."""
    from transformers.generation.continuous_batching.utils import WorkloadHints

    gen_cfg = _cb_config(w)
    hints = WorkloadHints(max_prompt_length=max(map(len, w["prompts"])), max_generated_length=max(w["limits"]),
                          num_requests=len(w["limits"]))  # fmt: skip

    def once(rows: dict) -> list:
        results = {}
        with model.continuous_batching_context_manager(generation_config=gen_cfg, block=True, timeout=5,
                                                       workload_hints=hints) as manager:  # fmt: skip
            ids = [manager.add_request(p, request_id=f"r{i}", max_new_tokens=lim, eos_token_id=EOS)
                   for i, (p, lim) in enumerate(zip(rows["prompts"], rows["limits"], strict=True))]  # fmt: skip
            while len(results) < len(ids):
                r = manager.get_result(timeout=1)
                if r is not None and r.is_finished():
                    results[r.request_id] = r
                elif r is None and not manager.is_running():
                    break
        return [results.get(i) for i in ids]

    once(warmup_rows(w))
    meter = Meter(device)
    out = once(w)
    return _cb_tally(w, out, meter.stop())


def run_seed(model, w: dict, device) -> dict:
    """The model card: one prompt at a time, sampling, the row's own limit."""

    def one(p, lim):
        ids = torch.tensor([p], device=device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **HF_SAMPLING, max_new_tokens=lim,
                                 pad_token_id=EOS, eos_token_id=EOS)  # fmt: skip
        return _first_eos_len(out[0, len(p) :].tolist(), out.shape[1] - len(p))

    one(w["prompts"][0], 8)  # warm-up
    meter = Meter(device)
    produced = sum(one(p, lim) for p, lim in zip(w["prompts"], w["limits"], strict=True))
    m = meter.stop()
    return {"rows": len(w["limits"]), **m, "output_tokens": produced,
            "output_tokens_per_s": produced / m["wall_s"]}  # fmt: skip


# ----------------------------------------------------------------------------------------------- driver


def bench_workload(name: str, replica, w: dict, p: dict, device, systems: set[str]) -> dict:
    model = replica.hf  # the same weights in HF's GPT2LMHeadModel, for the HF peers
    res: dict = {"workload": describe(w)}
    t0 = time.perf_counter()
    if "ours" in systems:
        per = {}
        for n in p["max_num_seqs"]:
            try:
                per[n] = run_ours(replica, w, n, device)
                per[n].pop("samples")
                print(f"  [{name}] ours max_num_seqs={n}: {per[n]['output_tokens_per_s']:,.0f} tok/s, useful slots "
                      f"{per[n]['useful_slot_fraction']:.3f}, wall {per[n]['wall_s']:.1f}s", flush=True)  # fmt: skip
            except Exception as e:  # noqa: BLE001 - an engine bug is a result here
                per[n] = _error(e)
                print(f"  [{name}] ours max_num_seqs={n}: FAILED {per[n]['error']}", flush=True)
        ok = {k: v for k, v in per.items() if "error" not in v}
        if ok:
            best = max(ok, key=lambda k: ok[k]["output_tokens_per_s"])
            res["ours"] = {**ok[best], "best_max_num_seqs": best, "per_max_num_seqs": per}
        else:
            res["ours"] = {"error": "every max_num_seqs failed", "per_max_num_seqs": per}
    if "hf_static" in systems:
        res["hf_static"] = run_hf_static(model, w, p["hf_batch_sizes"], device)
    if "seed" in systems:
        sw = subset(w, p["seed_rows"])
        try:
            res["seed"] = {**run_seed(model, sw, device), "note": f"the first {len(sw['limits'])} rows only"}
        except Exception as e:  # noqa: BLE001
            res["seed"] = _error(e)
        print(
            f"  [{name}] seed: {res['seed'].get('output_tokens_per_s', res['seed'].get('error'))}", flush=True
        )
    cw = subset(w, p["cb_rows"])
    cb_note = (f"the first {len(cw['limits'])} of {len(w['limits'])} rows (HF continuous batching is slow on CPU)"
               if len(cw["limits"]) < len(w["limits"]) else "all rows")  # fmt: skip
    for key, fn in (("hf_cb", run_hf_cb), ("hf_cb_per_row", run_hf_cb_per_row)):
        if key not in systems:
            continue
        if key == "hf_cb_per_row" and len(set(cw["limits"])) == 1:
            res[key] = {"skipped": "every row has the same limit: the same run as hf_cb"}
            continue
        attn = model.config._attn_implementation
        try:
            res[key] = {**fn(model, cw, device), "note": cb_note}
        except Exception as e:  # noqa: BLE001 - e.g. unsupported on this device: recorded, not fatal
            res[key] = {**_error(e), "note": cb_note}
        if model.config._attn_implementation != attn:  # CB may switch it; put it back for whoever runs next
            res[key]["attn_implementation_switched_to"] = model.config._attn_implementation
            model.set_attn_implementation(attn)
        print(f"  [{name}] {key}: {res[key].get('useful_tokens_per_s', res[key].get('error'))}", flush=True)
    # ours on the CB/seed subsamples too, so that those comparisons are on the same rows
    if "ours" in res and "error" not in res["ours"]:
        best = res["ours"]["best_max_num_seqs"]
        for key, n in (("ours_on_cb_rows", p["cb_rows"]), ("ours_on_seed_rows", p["seed_rows"])):
            sw = subset(w, n)
            if len(sw["limits"]) < len(w["limits"]):
                try:
                    res[key] = run_ours(replica, sw, min(best, len(sw["limits"])), device)
                    res[key].pop("samples")
                except Exception as e:  # noqa: BLE001
                    res[key] = _error(e)
    res["wall_s"] = time.perf_counter() - t0
    return res


def sampling_share(replica, device, rows: int = 256, prompt: int | None = None, kv_gb: float = 2.0) -> dict:
    """The sampler's cost next to the model's decode step, both at `rows` running sequences: one decode step
    of the model runner, then what the engine does to its logits (sampling at t=0.8/top-p 0.95 plus the NLL
    log-softmax). The random model's logits are flat, which forces the full-vocabulary path (a sort); logits
    x 20 stand for a trained model's peaked ones, which take the 256-candidate path. Each is timed on the
    path the engine takes for it."""
    from fengshen_batch.engine.sampler import sample, sample_key
    from fengshen_batch.engine.sequence import Request

    params = GenerateParams(max_new_tokens=16, temperature=TEMPERATURE, top_p=TOP_P)
    engine = LLMEngine(
        replica, params, EngineParams(max_num_seqs=rows, cpu_kv_cache_gb=kv_gb), token_budget=1 << 16
    )
    prompt = prompt or min(128, replica.max_length // 2)
    for i in range(rows):
        engine.add(Request(i, [1 + i % 97] * prompt, [sample_key(0, str(i), 0)], 16))
    while engine.scheduler.waiting or engine.scheduler.prefilling:
        engine.step()
    plan = engine.scheduler.schedule()
    logits = engine.runner.decode(plan)
    keys = torch.tensor([s.key for s in plan.seqs], device=device)
    steps = torch.ones_like(keys)

    def timed(fn, n=10):
        fn()
        sync(device)
        start = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        return (time.perf_counter() - start) / n * 1e3

    model_ms = timed(lambda: engine.runner.decode(plan))
    out = {
        "rows": len(plan.seqs),
        "span": max(s.position for s in plan.seqs) + 1,
        "decode_model_ms": model_ms,
    }
    for name, lg in (("flat", logits), ("peaked", logits * 20)):
        redraw = sample(lg, keys, steps, params)[1]
        full = bool(
            redraw is not None and redraw.float().mean() > 0.5
        )  # the engine's switch to the full path
        ms = timed(lambda lg=lg, full=full: (sample(lg, keys, steps, params, full=full), lg.log_softmax(-1)))
        out[f"sampler_ms_{name}"] = ms
        out[f"sampler_share_{name}"] = ms / (ms + model_ms)
        out[f"redraw_fraction_{name}"] = None if redraw is None else float(redraw.float().mean())
    return out


def sampling_share_35b(device, dtype, rows: int = 256, prompt: int = 16) -> dict:
    """`sampling_share` against the GPT2-3.5B shape's decode step (its width, heads and vocabulary of 50,304).
    On a CPU the full 30 layers would take minutes to prefill, so the step is measured with 1 and 2 layers and
    extrapolated linearly in the layer count (a decode step is embeddings + layers + LM head, each layer the
    same work); the sampler works on the LM head's logits, which do not depend on the depth."""
    runs = {}
    for layers in (1, 2):
        # n_positions 64 (prompt + 16 new tokens fit): a slot per sequence at 1,024 positions would need 6 GB
        # of KV cache per layer here; the decode step's work does not depend on it
        replica = build({**GPT2_35B, "n_layer": layers, "n_positions": 64}, device, dtype)
        runs[layers] = sampling_share(replica, device, rows, prompt, kv_gb=2.0)
        assert runs[layers]["rows"] == rows, runs[layers]
        del replica
        gc.collect()
    per_layer = runs[2]["decode_model_ms"] - runs[1]["decode_model_ms"]
    model_ms = runs[1]["decode_model_ms"] + (GPT2_35B["n_layer"] - 1) * per_layer
    out = {
        "rows": rows,
        "prompt_tokens": prompt,
        "decode_model_ms_1_layer": runs[1]["decode_model_ms"],
        "decode_model_ms_2_layers": runs[2]["decode_model_ms"],
        "decode_model_ms_30_layers_extrapolated": model_ms,
    }
    for name in ("flat", "peaked"):
        ms = (runs[1][f"sampler_ms_{name}"] + runs[2][f"sampler_ms_{name}"]) / 2
        out[f"sampler_ms_{name}"] = ms
        out[f"sampler_share_{name}"] = ms / (ms + model_ms)
        out[f"redraw_fraction_{name}"] = runs[1][f"redraw_fraction_{name}"]
    return out


def _rate(r: dict | None, key: str) -> float | None:
    return None if not r or "error" in r else r.get(key)


def comparisons(res: dict) -> dict:
    ours = res.get("ours", {})
    o = _rate(ours, "output_tokens_per_s")
    out = {}
    hs = _rate(res.get("hf_static"), "useful_tokens_per_s")
    if o and hs:
        out["ours_vs_hf_static"] = o / hs
    for key in ("hf_cb", "hf_cb_per_row"):
        same = res.get("ours_on_cb_rows") or ours
        c, oc = _rate(res.get(key), "useful_tokens_per_s"), _rate(same, "output_tokens_per_s")
        if c and oc:
            out[f"ours_vs_{key}_same_rows"] = oc / c
    s, os_ = _rate(res.get("seed"), "output_tokens_per_s"), _rate(res.get("ours_on_seed_rows") or ours,
                                                                   "output_tokens_per_s")  # fmt: skip
    if s and os_:
        out["ours_vs_seed_same_rows"] = os_ / s
    if o and s:
        out["ours_full_vs_seed"] = o / s
    return out


def _timed_runs(res: dict) -> list[dict]:
    runs = list(res.get("ours", {}).get("per_max_num_seqs", {}).values())
    runs += list(res.get("hf_static", {}).get("per_batch_size", {}).values())
    runs += [
        res[k] for k in ("hf_cb", "hf_cb_per_row", "seed", "ours_on_cb_rows", "ours_on_seed_rows") if k in res
    ]
    return runs


def _fmt(v, spec=",.0f") -> str:
    return "n/a" if v is None else format(v, spec)


def _row(name: str, system: str, rows, config: str, r: dict) -> str:
    """One table line; a system's missing figures stay blank. `useful`/`raw` fall back to the output rate
    (ours never exceeds a row's limit, so for ours they are the same)."""
    if "error" in r:
        return f"| {name} | {system} | {rows} | {config} | FAILED: {r['error'][:60]} |" + " |" * 6
    out = r.get("output_tokens_per_s")
    cells = [
        _fmt(r.get("useful_tokens_per_s", out)),
        _fmt(r.get("raw_tokens_per_s", out)),
        _fmt(r.get("useful_slot_fraction"), ".3f") if "useful_slot_fraction" in r else "",
        _fmt(r.get("prefill_tokens_per_s")) if "prefill_tokens_per_s" in r else "",
        _fmt(r.get("decode_tokens_per_s")) if "decode_tokens_per_s" in r else "",
        _fmt(r.get("syncs_per_step"), ".2f") if "syncs_per_step" in r else "",
        _fmt(r.get("peak_gb"), ".1f") if "peak_gb" in r else "",
    ]
    return f"| {name} | {system} | {rows} | {config} | " + " | ".join(cells) + " |"


def table(results: dict) -> str:
    lines = ["| workload | system | rows | config | useful tok/s | raw tok/s | useful slots | prefill tok/s | "
             "decode tok/s | syncs/step | peak GB |", "|" + " --- |" * 11]  # fmt: skip
    for name, res in results.items():
        rows = res["workload"]["rows"]
        ours = res.get("ours", {})
        for n, r in ours.get("per_max_num_seqs", {}).items():
            star = " (best)" if n == ours.get("best_max_num_seqs") else ""
            lines.append(_row(name, "ours", rows, f"max_num_seqs={n}{star}", r))
        hs = res.get("hf_static", {})
        for bs, r in hs.get("per_batch_size", {}).items():
            star = " (best)" if bs == hs.get("best_batch_size") else ""
            lines.append(_row(name, "hf_static", rows, f"batch={bs}{star}", r))
        for key, config in (("hf_cb", "max_new_tokens=max limit"), ("hf_cb_per_row", "per-row limits")):
            r = res.get(key)
            if not r or "skipped" in r:
                continue
            if r.get("useful_tokens_per_s_in_window"):
                config += (f" ({_fmt(r['useful_tokens_per_s_in_window'])} useful tok/s after "
                           f"{r['startup_and_shutdown_s']:.1f}s start-up)")  # fmt: skip
            lines.append(_row(name, key, r.get("rows", ""), config, r))
        for key, label in (("ours_on_cb_rows", "ours (CB rows)"), ("ours_on_seed_rows", "ours (seed rows)")):
            r = res.get(key)
            if r and "error" not in r:
                lines.append(_row(name, label, r["rows"], f"max_num_seqs={r['max_num_seqs']}", r))
        r = res.get("seed")
        if r and "error" not in r:
            lines.append(_row(name, "seed (one at a time)", r["rows"], "", r))
    return "\n".join(lines)


def _provenance(device) -> dict:
    """Which machine, code and library versions a result file's figures are for."""
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{torch.get_num_threads()}t"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        )
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT)  # fmt: skip
    except FileNotFoundError:  # a machine without git (the GPU machines' image)
        sha = subprocess.CompletedProcess([], 1, os.environ.get("FENGSHEN_GIT_SHA", ""), "")
        dirty = subprocess.CompletedProcess([], 1, "", "")
    # the working tree may differ from HEAD: a digest of the code that ran says which engine these figures are for
    code = hashlib.sha1()
    for f in sorted((ROOT / "fengshen_batch").rglob("*.py")):
        code.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes())
    return {
        "device": name.lower().replace(" ", "-"), "date": dt.date.today().isoformat(),
        "git_sha": sha.stdout.strip() or None, "git_dirty": bool(dirty.stdout.strip()),
        "code_sha1": code.hexdigest()[:12],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version(), "numpy": np.__version__},
        "threads": torch.get_num_threads(),
    }  # fmt: skip


def sampler_only(device, dtype, out_dir: str) -> None:
    """`--sampler-only`: writes results/sampler-<device>-<date>.json."""
    wall0 = time.perf_counter()
    res = {**_provenance(device), "dtype": str(dtype).removeprefix("torch."),
           "sampling": {"temperature": TEMPERATURE, "top_p": TOP_P},
           "sampling_at_256_35b_shape": sampling_share_35b(device, dtype)}  # fmt: skip
    res["target"] = {"sampler_share": "<= 0.10 of a decode step at 256 sequences",
                     "met": all(res["sampling_at_256_35b_shape"][f"sampler_share_{k}"] <= 0.10
                                for k in ("flat", "peaked"))}  # fmt: skip
    res["wall_s"] = time.perf_counter() - wall0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"sampler-{res['device']}-{dt.date.today().strftime('%Y%m%d')}.json"
    path.write_text(json.dumps(res, indent=2, default=str))
    print(json.dumps(res["sampling_at_256_35b_shape"], indent=1), f"\n-> {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="a smoke test: few rows, one setting per system")
    ap.add_argument("--workloads", default="mixed,fixed")
    ap.add_argument("--systems", default="ours,hf_static,seed,hf_cb,hf_cb_per_row")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: the cores this process may use). On a CPU shared with other "
        "work, 2 OpenMP threads on 2 cores stall at every op's barrier; 1 thread is the steadier figure",
    )
    ap.add_argument(
        "--sampler-only",
        action="store_true",
        help="only the sampler's share of a GPT2-3.5B-shaped decode step at 256 sequences",
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    wall0 = time.perf_counter()
    load0 = os.getloadavg()
    device = torch.device(args.device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(args.threads or cores)
    p = plan(device, args.quick)
    cfg = p["cfg"]
    dtype = getattr(torch, p["dtype"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    if args.sampler_only:
        return sampler_only(device, dtype, args.out)
    rng = np.random.default_rng(0)
    replica = build(cfg, device, dtype)
    workloads = {
        "mixed": lambda: workload(rng, cfg, p["mixed_rows"], p["prompt_range"], p["limit_range"]),
        "fixed": lambda: workload(rng, cfg, p["fixed_rows"], (p["fixed"][0],) * 2, (p["fixed"][1],) * 2),
    }
    systems = set(args.systems.split(","))
    results = {}
    for name in args.workloads.split(","):
        w = workloads[name]()
        print(f"{name}: {describe(w)}", flush=True)
        todo = systems - set(p.get("skip", []))
        if name == "fixed" and "fixed_systems" in p:
            todo &= set(p["fixed_systems"])
        results[name] = bench_workload(name, replica, w, p, device, todo)
        results[name]["comparisons"] = comparisons(results[name])
        print(f"  [{name}] {results[name]['comparisons']} ({results[name]['wall_s']:.0f}s)", flush=True)

    sampling = None if args.quick else sampling_share(replica, device)
    if sampling:
        print(f"sampling at 256 sequences: {sampling}", flush=True)

    mixed = results.get("mixed", {})
    ratio = mixed.get("comparisons", {}).get("ours_vs_hf_static")
    usf = _rate(mixed.get("ours"), "useful_slot_fraction")
    targets = {
        "ours_vs_hf_static_mixed": {"target": ">= 1.5", "value": ratio, "met": ratio is not None and ratio >= 1.5},
        "ours_useful_slot_fraction_mixed": {"target": ">= 0.90", "value": usf, "met": usf is not None and usf >= 0.90},
    }  # fmt: skip
    if args.quick:
        for t in targets.values():
            t["note"] = "quick: a smoke test on a few rows, not a measurement of the target"
    prov = _provenance(device)
    slug = prov["device"]
    result = {
        **prov, "quick": args.quick, "cores": cores, "config": cfg, "dtype": p["dtype"],
        "sampling": {"temperature": TEMPERATURE, "top_p": TOP_P, "top_k": 0, "eos_id": EOS, "ignore_eos": False},
        "plan": {k: v for k, v in p.items() if k != "cfg"}, "results": results, "targets": targets,
        "sampling_at_256": sampling,
        "wall_s": time.perf_counter() - wall0, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "notes": [
            "useful tok/s counts min(row limit, produced) per row; ours never exceeds the limit, so for ours "
            "useful = raw. hf_static's useful_slot_fraction is useful tokens / sum over batches of rows x the "
            "batch's largest limit; ours' is decode tokens / decode slots computed (engine stats).",
            "hf_cb uses generate_batch with one max_new_tokens (the largest limit); hf_cb_per_row feeds the same "
            "manager request by request with each row's own limit (add_request accepts max_new_tokens).",
            "ours_on_cb_rows / ours_on_seed_rows: our engine on exactly the subsample the CB / seed runs used.",
            "the model has random weights: EOS (id 0) is rare, so outputs end at the per-row limits.",
        ],
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"generate-{slug}-{dt.date.today().strftime('%Y%m%d')}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print()
    print(table(results))
    print()
    for k, t in targets.items():
        print(f"target {k}: {_fmt(t['value'], '.3f')} ({t['target']}): {'met' if t['met'] else 'NOT met'}"
              + (" (quick run: not meaningful)" if args.quick else ""))  # fmt: skip
    loads = [r.get("load_1m_after") for res in results.values() for r in _timed_runs(res)]
    loads = [x for x in loads if x is not None]
    if loads and max(loads) > 1.5 * torch.get_num_threads():
        print(f"note: the 1-minute load reached {max(loads):.1f} on {torch.get_num_threads()} threads during timed "
              "runs: other processes shared the CPU, so the figures are noisy (see load_1m_* per run)")  # fmt: skip
    print(f"wrote {path} ({result['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
