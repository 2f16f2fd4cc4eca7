"""Issue 31's GPU figures in one prepared run that fits a lent device's minutes (a benchmark, never a test).

    python benchmarks/bench_gpu.py                  # on the device: GPT2-3.5B shape, random weights, bf16
    python benchmarks/bench_gpu.py --device cpu --quick   # a smoke test of the script itself, here

It writes benchmarks/results/<device>-<yyyymmdd>.json after every section, so a run stopped by its time-out
keeps what ran, and skips a section whose estimate no longer fits in `--budget-s`. Sections, most wanted first:
    kernel      Triton paged decode against SDPA over the same gathered K/V at the 3.5B head shape (max error),
                and its time per layer against the gather + SDPA it replaces;
    generation  fixed 128 + 128 tokens (EOS ignored) at batch 1, 128 and 256: `roofline_fraction` as bench.py;
    generation_mixed  bench_generate's mixed workload (1,024 rows, prompts 16..512, limits 32..512, EOS on,
                sampling) at 256 sequences, with the roofline of its own schedule: every decode step reads the
                weights and its rows' live K/V (the engine counts them), prefill at the matmul peak;
    few_shot    bench_prefix's few-shot workload (a 384-token header on 1,024 prompts), caching on, then off;
    memory      sequences at once when 17 GB hold K/V (a 24 GB card) at median length 400: the block planner's
                count, against the 45 whole-context slots of the slot cache;
    scoring     1024-token documents at one token budget: MFU;
    hf_static   HF static batched generate on the first 128 mixed rows (its best batch of 64), the peer.
Keys match issue 31's list (`generation.per_batch_size.<B>.roofline_fraction`, `generation_mixed.*`,
`few_shot.decode_seconds`, `memory.sequences_24gb_median_400`, `scoring.mfu`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import (  # noqa: E402
    CPU_SMALL,
    GPT2_35B,
    bandwidth_gbps,
    build,
    flops_per_token,
    peak_tflops,
    random_docs,
    roofline_tokens_per_s,
    timed,
)
from benchmarks.bench_generate import _provenance, describe, plan, run_hf_static, run_ours, workload  # noqa: E402
from benchmarks.bench_prefix import few_shot, sizes  # noqa: E402
from fengshen_batch.engine import triton_decode  # noqa: E402
from fengshen_batch.engine.kv_cache import BLOCK, block_bytes  # noqa: E402
from fengshen_batch.engine.llm_engine import LLMEngine  # noqa: E402
from fengshen_batch.kinds.generation import generate_tokens  # noqa: E402
from fengshen_batch.kinds.scoring import score_tokens  # noqa: E402
from fengshen_batch.params import EngineParams, GenerateParams  # noqa: E402


def kernel_check(device, dtype, cfg, rows=64) -> dict:
    """Triton decode vs SDPA over the same K/V at the model's head shape, with a shared 384-token prefix on
    half the rows (cascade tiles) and ragged lengths up to the context."""
    H, hd, ctx = cfg["n_head"], cfg["n_embd"] // cfg["n_head"], cfg["n_positions"]
    nb = ctx // BLOCK
    g = torch.Generator(device="cpu").manual_seed(0)
    blocks = rows * nb + 1
    k = torch.randn(H, blocks, BLOCK, hd, generator=g).to(device, dtype)
    v = torch.randn(H, blocks, BLOCK, hd, generator=g).to(device, dtype)
    tables = (torch.randperm(blocks - 1, generator=g)[: rows * nb] + 1).view(rows, nb)
    tables[: rows // 2, :24] = tables[0, :24]  # a 384-token header shared by half the rows
    lens = torch.randint(1, ctx + 1, (rows,), generator=g)
    lens[: rows // 2] = torch.randint(24 * BLOCK + 1, ctx + 1, (rows // 2,), generator=g)
    q = torch.randn(rows, H, hd, generator=g).to(device, dtype)
    att = triton_decode.TritonDecode(rows, H, hd, nb, device)
    tile_rows, tile_len, starts = triton_decode.cascade_tiles(
        tables.tolist(), lens.tolist(), att.splits.tiles
    )
    t = lambda x: torch.tensor(x, device=device)  # noqa: E731
    args = (q, k, v, tables.to(device), lens.to(device), t(starts), t(tile_rows), t(tile_len), hd**-0.5)
    got = att(*args)
    keys = k[:, tables.to(device)].reshape(H, rows, nb * BLOCK, hd).transpose(0, 1)
    vals = v[:, tables.to(device)].reshape(H, rows, nb * BLOCK, hd).transpose(0, 1)
    mask = (torch.arange(nb * BLOCK, device=device) < lens.to(device)[:, None])[:, None, None]
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q[:, :, None], keys, vals, attn_mask=mask, scale=hd**-0.5
    )
    want = sdpa()[:, :, 0]
    gather = lambda: (k[:, tables.to(device)], v[:, tables.to(device)], sdpa())  # noqa: E731
    return {"max_abs_err": (got.float() - want.float()).abs().max().item(), "rows": rows,
            "tiles_used": sum(1 for n in tile_len if n), "triton_ms": 1e3 * timed(lambda: att(*args), device, 5),
            "gather_sdpa_ms": 1e3 * timed(gather, device, 5)}  # fmt: skip


def fixed(replica, cfg, peak, bw, device, rng, batches, prompt=128, new=128) -> dict:
    params = GenerateParams(greedy=True, max_new_tokens=new, ignore_eos=True)
    prompts = random_docs(rng, cfg, [prompt] * max(batches))
    per = {}
    for b in batches:
        engine = LLMEngine(replica, params, EngineParams(max_num_seqs=b))
        ids = [str(i) for i in range(b)]
        s = timed(lambda ids=ids, e=engine: generate_tokens(replica, prompts[: len(ids)], ids, params, engine=e),
                  device)  # fmt: skip
        roof = roofline_tokens_per_s(cfg, b, prompt, new, peak, bw, torch.finfo(replica.dtype).bits // 8)
        per[b] = {"output_tokens_per_s": b * new / s, "roofline_fraction": b * new / s / roof,
                  "decode_attention": "triton" if engine.runner.triton else "sdpa" if device.type == "cuda" else "cpu"}  # fmt: skip
        print(f"  fixed batch {b}: {per[b]}", flush=True)
        del engine
    return {"per_batch_size": per, "prompt_tokens": prompt, "new_tokens": new}


def schedule_roofline(r: dict, cfg, peak, bw, dtype_bytes) -> float:
    """Seconds the run's own schedule needs at the limits: decode steps read the weights and their rows' live
    K/V (summed over the run: a lower bound of the per-step maxima), prefill runs at the matmul peak."""
    st = r["stats"]
    d, layers = cfg["n_embd"], cfg["n_layer"]
    weights = (layers * (4 * d * d + 2 * d * cfg["n_inner"]) + cfg["vocab_size"] * d) * dtype_bytes
    kv = st["decode_kv_live"] * 2 * layers * d * dtype_bytes
    decode_bytes = st["decode_steps"] * weights + kv
    decode_flops = st["decode_tokens"] * flops_per_token(cfg, cfg["n_positions"] // 2)
    prefill = st["prefill_tokens"] * flops_per_token(cfg, cfg["n_positions"] // 2) / (peak * 1e12)
    return max(decode_bytes / (bw * 1e9), decode_flops / (peak * 1e12)) + prefill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=450)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = GPT2_35B if cuda else {**CPU_SMALL, "n_positions": 576, "n_head": 8}
    dtype = torch.bfloat16 if cuda else torch.float32
    rng = np.random.default_rng(0)
    result = {**_provenance(device), "benchmark": "bench_gpu (issue 31)", "config": cfg, "quick": args.quick,
              "triton": getattr(triton_decode.triton, "__version__", None), "sections_s": {}, "errors": {}}  # fmt: skip
    path = (
        Path(args.out) / f"{result['device']}-{dt.date.today():%Y%m%d}{'-quick' if args.quick else ''}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        result["wall_s"] = time.perf_counter() - t0
        path.write_text(json.dumps(result, indent=2, default=str))

    def section(name, estimate_s, fn):
        left = args.budget_s - (time.perf_counter() - t0)
        if left < estimate_s:
            result["errors"][name] = f"skipped: {left:.0f} s left of the budget, needs about {estimate_s} s"
            save()
            return
        s = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as e:  # noqa: BLE001 - recorded, the next section runs
            result["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
        result["sections_s"][name] = time.perf_counter() - s
        print(f"{name}: {time.perf_counter() - s:.1f} s", flush=True)
        save()

    peak, bw = peak_tflops(device, dtype), bandwidth_gbps(device)
    result.update(peak_tflops=peak, hbm_gbps=bw)
    if cuda:
        section("kernel", 10, lambda: kernel_check(device, dtype, cfg))
    replica = build(cfg, device, dtype)
    dtype_bytes = torch.finfo(dtype).bits // 8
    batches = [1, 8] if args.quick else [1, 128, 256]
    section("generation", 60, lambda: fixed(replica, cfg, peak, bw, device, rng, batches))

    g = plan(device, args.quick)
    mixed = workload(rng, cfg, 64 if args.quick else g["mixed_rows"], (16, 128) if args.quick else g["prompt_range"],
                     (8, 64) if args.quick else g["limit_range"])  # fmt: skip
    warm = workload(rng, cfg, 4, (16, 32), (4, 8))

    def run_mixed():
        r = run_ours(replica, mixed, 32 if args.quick else 256, device, warm=warm)
        r.pop("samples")
        r["roofline_fraction"] = schedule_roofline(r, cfg, peak, bw, dtype_bytes) / r["wall_s"]
        r["workload"] = describe(mixed)
        return r

    section("generation_mixed", 90, run_mixed)

    def run_few_shot():
        p = sizes(device, args.quick)
        w = few_shot(rng, cfg, p["rows"], p["header"], p["part"], p["limits"])
        out = {"workload": describe(w)}
        for name, caching in (("on", True), ("off", False)):
            r = run_ours(replica, w, p["max_num_seqs"], device, prefix_caching=caching, warm=warm)
            r.pop("samples")
            out[name] = r
            save()
        on = out["on"]
        out.update(decode_seconds=on["stats"]["decode_seconds"], output_tokens_per_s=on["output_tokens_per_s"],
                   on_vs_off=out["off"]["wall_s"] / on["wall_s"])  # fmt: skip
        return out

    section("few_shot", 60, run_few_shot)

    per_block = block_bytes(GPT2_35B["n_layer"], GPT2_35B["n_embd"], torch.bfloat16)
    result["memory"] = {"sequences_24gb_median_400": int(17e9 // per_block) // -(-400 // BLOCK),
                        "slot_cache_sequences": 45, "block_bytes": per_block,
                        "note": "the block planner's count for 17 GB of K/V at 400 live tokens a sequence"}  # fmt: skip
    save()

    def scoring():
        docs = random_docs(rng, cfg, [cfg["n_positions"]] * (32 if args.quick else 256))
        s = timed(lambda: score_tokens(replica, docs, token_budget=4 * cfg["n_positions"] if args.quick else 32768),
                  device)  # fmt: skip
        tps = len(docs) * cfg["n_positions"] / s
        return {"tokens_per_s": tps, "mfu": tps * flops_per_token(cfg, cfg["n_positions"]) / (peak * 1e12)}

    section("scoring", 40, scoring)

    def hf_static():
        w = {k: v[: 16 if args.quick else 128] for k, v in mixed.items()}
        r = run_hf_static(replica.hf, w, [8] if args.quick else [64], device)
        ours = result.get("generation_mixed", {}).get("output_tokens_per_s")
        return {**r, "rows": len(w["limits"]), "ours_vs_hf_static": ours / r["useful_tokens_per_s"]
                if ours and r.get("useful_tokens_per_s") else None}  # fmt: skip

    section("hf_static", 120, hf_static)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
