"""Throughput of the engine and the job against the hardware's limits (a benchmark, never a test).

    make bench       # on a GPU: the exact GPT2-3.5B config, random weights, bf16
    make bench-cpu   # here: a small config in float32, a few minutes

Measures the device's matmul peak and memory bandwidth, then scoring (1024-token documents and a realistic
length mix), generation (128-token prompts, 128 new tokens, EOS ignored) at several batch sizes, the seed
model cards' one-at-a-time usage and HF `generate` on padded batches as baselines, the whole Ray job over
the engine alone, and model load time. Writes benchmarks/results/<device>-<yyyymmdd>.json and the table in
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fengshen_batch.engine.llm_engine import LLMEngine  # noqa: E402
from fengshen_batch.kinds.generation import generate_tokens  # noqa: E402
from fengshen_batch.kinds.scoring import score_tokens  # noqa: E402
from fengshen_batch.model.load import Replica, load_replica  # noqa: E402
from fengshen_batch.params import EngineParams, GenerateParams  # noqa: E402

GPT2_35B = dict(vocab_size=50304, n_positions=1024, n_embd=3072, n_layer=30, n_head=32, n_inner=12288)
CPU_SMALL = dict(vocab_size=8192, n_positions=256, n_embd=256, n_layer=4, n_head=4, n_inner=1024)


class NullTokenizer:
    """Stands in for a tokenizer where only token ids matter (decoding is not what is timed)."""

    eos_token_id = 0

    def decode(self, ids, **_):
        return ""

    def batch_decode(self, lists, **_):
        return [""] * len(lists)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int = 1) -> float:
    """Best wall time of `repeat` runs after one warm-up (keeps compile/alloc out of the figure)."""
    fn()
    sync(device)
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def peak_tflops(device, dtype) -> float:
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    t = timed(lambda: a @ b, device, repeat=10)
    return 2 * n**3 / t / 1e12


def bandwidth_gbps(device) -> float:
    n = (1 << 30 if device.type == "cuda" else 1 << 26) // 4
    x = torch.empty(n, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), device, repeat=10)
    return 2 * x.numel() * 4 / t / 1e9  # read + write


def build(cfg: dict, device, dtype) -> Replica:
    """A random-weight model of `cfg`: our replica over the weights of an HF `GPT2LMHeadModel`, which stays
    reachable as `replica.hf` for the peers (HF generate, the seed's usage)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fengshen_batch.engine.gpt2 import GPT2

    config = GPT2Config(**cfg, activation_function="gelu_fast", layer_norm_epsilon=1e-5, bos_token_id=0,
                        eos_token_id=0)  # fmt: skip
    with torch.device(device):
        model = GPT2LMHeadModel._from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.eval().requires_grad_(False)
    replica = Replica(GPT2.from_hf(model), NullTokenizer(), device, dtype, cfg["n_positions"], 0, "random")
    replica.hf = model
    return replica


def flops_per_token(cfg: dict, ctx: int) -> float:
    """Matmul FLOPs per token (the LM head included) plus causal attention at context `ctx`."""
    d, layers = cfg["n_embd"], cfg["n_layer"]
    params = layers * (4 * d * d + 2 * d * cfg["n_inner"]) + cfg["vocab_size"] * d
    return 2 * params + 2 * layers * d * ctx


def random_docs(rng, cfg, lengths) -> list[list[int]]:
    return [rng.integers(1, cfg["vocab_size"], size=int(n)).tolist() for n in lengths]


def bench_scoring(replica, cfg, peak, device, rng, quick) -> dict:
    ctx = cfg["n_positions"]
    docs = random_docs(rng, cfg, [ctx] * (8 if quick else 64))
    budgets = [4 * ctx, 16 * ctx] if quick else [8192, 16384, 32768, 65536]
    per_budget = {}
    for budget in budgets:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = timed(lambda b=budget: score_tokens(replica, docs, token_budget=b), device, repeat=2)
        per_budget[budget] = {"tokens_per_s": len(docs) * ctx / t, "peak_gb": _peak_gb(device)}
    best = max(per_budget, key=lambda b: per_budget[b]["tokens_per_s"])
    tps = per_budget[best]["tokens_per_s"]
    # the seed's usage: one text at a time, full logits (as `model(**tokenizer(text))` then log_softmax)
    seed_docs = docs[:4]

    def seed():
        with torch.inference_mode():
            for doc in seed_docs:
                ids = torch.tensor([[0, *doc[:-1]]], device=device)
                replica.hf(ids).logits.float().log_softmax(-1).gather(
                    -1, torch.tensor([doc], device=device)[..., None]
                )

    seed_tps = len(seed_docs) * ctx / timed(seed, device)
    # a realistic mix: log-normal lengths, median ~300 tokens, some beyond the context
    mix_lengths = np.clip(rng.lognormal(math.log(300 * ctx / 1024), 0.9, 32 if quick else 256), 8, 3 * ctx)
    mix = random_docs(rng, cfg, mix_lengths)
    mix_tps = sum(map(len, mix)) / timed(lambda: score_tokens(replica, mix, token_budget=best), device)
    fpt = flops_per_token(cfg, ctx)
    return {"tokens_per_s": tps, "mfu": tps * fpt / (peak * 1e12), "flops_per_token": fpt,
            "token_budget": best, "speedup_vs_seed": tps / seed_tps, "seed_tokens_per_s": seed_tps,
            "mix_tokens_per_s": mix_tps, "per_token_budget": per_budget}  # fmt: skip


def roofline_tokens_per_s(cfg, batch, prompt, new, peak, bw, dtype_bytes) -> float:
    """Best possible decode rate: each step reads the weights and the KV cache, or is bound by its FLOPs."""
    d, layers = cfg["n_embd"], cfg["n_layer"]
    weights = (layers * (4 * d * d + 2 * d * cfg["n_inner"]) + cfg["vocab_size"] * d) * dtype_bytes
    kv_per_token = 2 * layers * d * dtype_bytes  # K and V of every layer (368,640 bytes for the 3.5B)
    total = batch * prompt * flops_per_token(cfg, prompt) / (peak * 1e12)  # prefill
    for t in range(new):
        ctx = prompt + t
        step_bytes = weights + batch * kv_per_token * ctx
        step_flops = batch * flops_per_token(cfg, ctx)
        total += max(step_bytes / (bw * 1e9), step_flops / (peak * 1e12))
    return batch * new / total


def bench_generation(replica, cfg, peak, bw, device, rng, quick) -> dict:
    prompt, new = (32, 32) if quick else (128, 128)
    sizes = [1, 4, 16] if quick else [1, 8, 32, 64, 128, 256]
    prompts = random_docs(rng, cfg, [prompt] * max(sizes))
    params = GenerateParams(greedy=True, max_new_tokens=new, ignore_eos=True)
    dtype_bytes = torch.finfo(replica.dtype).bits // 8
    per = {}
    for b in sizes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ids = [str(i) for i in range(b)]
        engine = LLMEngine(replica, params, EngineParams(max_num_seqs=b))
        t = timed(
            lambda ids=ids, engine=engine: generate_tokens(
                replica, prompts[: len(ids)], ids, params, engine=engine
            ),
            device,
        )
        tps = b * new / t
        roof = roofline_tokens_per_s(cfg, b, prompt, new, peak, bw, dtype_bytes)
        per[b] = {"output_tokens_per_s": tps, "roofline_fraction": tps / roof, "peak_gb": _peak_gb(device)}
    best = max(per, key=lambda b: per[b]["output_tokens_per_s"])
    model = replica.hf

    def seed():  # the model card's pipeline: one prompt at a time, sampling
        for p in prompts[:2]:
            ids = torch.tensor([p], device=device)
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=new,
                           min_new_tokens=new, pad_token_id=0)  # fmt: skip

    seed_tps = 2 * new / timed(seed, device)
    batch = torch.tensor(prompts[:best], device=device)

    def hf_batched():  # HF generate on a padded batch with its default (dynamic) cache
        model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False, max_new_tokens=new,
                       min_new_tokens=new, pad_token_id=0)  # fmt: skip

    hf_tps = best * new / timed(hf_batched, device)
    top = per[best]
    return {"output_tokens_per_s": top["output_tokens_per_s"], "roofline_fraction": top["roofline_fraction"],
            "batch_size": best, "speedup_vs_seed": top["output_tokens_per_s"] / seed_tps,
            "speedup_vs_hf_batched": top["output_tokens_per_s"] / hf_tps, "seed_tokens_per_s": seed_tps,
            "hf_batched_tokens_per_s": hf_tps, "prompt_tokens": prompt, "new_tokens": new, "per_batch_size": per}  # fmt: skip


def _peak_gb(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def _fits_24gb(scoring: dict, generation: dict) -> dict | None:
    """Settings whose measured peak leaves 2 GB spare on a 24 GB GPU (A10G, L4)."""
    if scoring["per_token_budget"][scoring["token_budget"]]["peak_gb"] is None:
        return None
    return {
        "scoring_token_budgets": [b for b, v in scoring["per_token_budget"].items() if v["peak_gb"] <= 22],
        "generation_batch_sizes": [b for b, v in generation["per_batch_size"].items() if v["peak_gb"] <= 22],
    }


def save_model_dir(replica, cfg, where: Path) -> Path:
    """The benchmark model as a loadable directory: its weights plus the tiny model's tokenizer (token ids
    below the tokenizer's small vocab are valid for the larger model)."""
    from transformers import AutoTokenizer

    from fengshen_batch.tiny_model import build_tiny_gpt2

    tiny = build_tiny_gpt2(where / "tokenizer-src", n_positions=cfg["n_positions"])
    replica.hf.save_pretrained(where / "model", safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(where / "model")
    return where / "model"


def bench_load(model_dir: Path, device, dtype_name) -> float:
    start = time.perf_counter()
    rep = load_replica(str(model_dir), device=str(device), dtype=dtype_name)
    sync(device)
    seconds = time.perf_counter() - start
    del rep
    return seconds


def bench_pipeline(model_dir: Path, cfg, device, dtype_name, quick) -> dict:
    """The full Ray job (Parquet in and out, one actor) over the engine alone on the same texts."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return {"efficiency": None, "note": "ray is not installed here"}
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fengshen_batch.job.run import run_job
    from fengshen_batch.kinds.scoring import score_texts
    from fengshen_batch.spec import build_spec
    from fengshen_batch.tiny_model import SAMPLE_LINES

    text = " ".join(SAMPLE_LINES)
    rep = load_replica(str(model_dir), device=str(device), dtype=dtype_name)
    per_doc = max(1, cfg["n_positions"] // max(1, len(rep.encode(text))))
    texts = [" ".join([text] * per_doc) + f" {i}" for i in range(192 if quick else 2048)]
    budget = 4 * cfg["n_positions"] if quick else 32768
    engine_s = timed(lambda: score_texts(rep, texts, token_budget=budget), device)
    rep = None  # free this replica before the job loads its own
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "in").mkdir()
        for i in range(4):
            pq.write_table(pa.table({"text": texts[i::4]}), Path(tmp) / "in" / f"part-{i}.parquet")
        spec = build_spec({"kind": "score", "model": str(model_dir), "input": f"{tmp}/in", "output": f"{tmp}/out",
                           "actors": 1, "token_budget": budget, "dtype": dtype_name,
                           "batch_size": 8 if quick else 128,  # many batches: start-up is then measurable
                           "gpus_per_actor": 1 if device.type == "cuda" else 0})  # fmt: skip
        manifest = run_job(spec, progress=lambda _: None)
    # the job's own rate excludes driver start-up but includes replica start-up and all I/O;
    # `steady` takes out the replica start-up too (time to the first result), which long jobs amortise
    job_s = manifest["counts"]["tokens"] / manifest["tokens_per_second"]
    first_batch = manifest["startup"].get(
        "first_batch", 0.0
    )  # the first batch's work counts as start-up here
    steady_s = job_s - first_batch
    steady = engine_s / steady_s if steady_s > 0.25 * job_s else None  # else start-up is most of the job
    return {"efficiency": engine_s / job_s, "efficiency_steady": steady, "engine_seconds": engine_s,
            "job_seconds": job_s, "startup": manifest["startup"],
            "wall_seconds_with_startup": manifest["wall_seconds"]}  # fmt: skip


def write_table(results_dir: Path) -> None:
    """The README's table: the latest result per device."""
    latest = {}
    for path in sorted(results_dir.glob("*.json")):
        r = json.loads(path.read_text())
        if "scoring" in r and "generation" in r:  # this script's files (the folder holds the others' too)
            latest[r["device"]] = (path.name, r)
    lines = ["| device | file | peak TFLOP/s | GB/s | scoring tok/s | MFU | gen tok/s (batch) | roofline | "
             "vs seed (score / gen) | vs HF batched | pipeline | load s | peak GB |",
             "|" + " --- |" * 13]  # fmt: skip
    for device, (name, r) in sorted(latest.items()):
        s, g, p = r["scoring"], r["generation"], r["pipeline"]
        eff = f"{p['efficiency']:.2f}" if p.get("efficiency") else "n/a"
        if p.get("efficiency_steady"):
            eff += f" ({p['efficiency_steady']:.2f} after start-up)"
        mem = f"{r['memory']['peak_gb']:.1f}" if r["memory"]["peak_gb"] else "n/a"
        lines.append(
            f"| {device} | {name} | {r['peak_bf16_tflops']:.1f} | {r['hbm_gbps']:.0f} | {s['tokens_per_s']:,.0f} | "
            f"{s['mfu']:.2f} | {g['output_tokens_per_s']:,.0f} ({g['batch_size']}) | {g['roofline_fraction']:.2f} | "
            f"{s['speedup_vs_seed']:.1f}x / {g['speedup_vs_seed']:.1f}x | {g['speedup_vs_hf_batched']:.2f}x | "
            f"{eff} | {r['load']['seconds']:.1f} | {mem} |"
        )
    readme = ROOT / "benchmarks" / "README.md"
    text = readme.read_text()
    start, end = "<!-- results -->", "<!-- /results -->"
    text = text[: text.index(start) + len(start)] + "\n" + "\n".join(lines) + "\n" + text[text.index(end) :]
    readme.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    device = torch.device(args.device)
    quick = device.type == "cpu"
    cfg = CPU_SMALL if quick else GPT2_35B
    dtype_name = "float32" if quick else "bfloat16"
    dtype = getattr(torch, dtype_name)
    rng = np.random.default_rng(0)
    if not quick:
        torch.backends.cuda.matmul.allow_tf32 = True

    peak = peak_tflops(device, dtype)
    bw = bandwidth_gbps(device)
    print(f"peak {peak:.1f} TFLOP/s ({dtype_name}), bandwidth {bw:.0f} GB/s", flush=True)
    replica = build(cfg, device, dtype)
    scoring = bench_scoring(replica, cfg, peak, device, rng, quick)
    print(f"scoring {scoring['tokens_per_s']:,.0f} tok/s, MFU {scoring['mfu']:.2f}", flush=True)
    generation = bench_generation(replica, cfg, peak, bw, device, rng, quick)
    print(f"generation {generation['output_tokens_per_s']:,.0f} tok/s at batch {generation['batch_size']}, "
          f"{generation['roofline_fraction']:.2f} of roofline", flush=True)  # fmt: skip
    peak_gb = _peak_gb(device)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model_dir(replica, cfg, Path(tmp))
        del replica
        if device.type == "cuda":
            torch.cuda.empty_cache()
        load_s = bench_load(model_dir, device, dtype_name)
        print(f"load {load_s:.1f}s", flush=True)
        pipeline = bench_pipeline(model_dir, cfg, device, dtype_name, quick)
    print(f"pipeline efficiency {pipeline['efficiency']}", flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{torch.get_num_threads()}t"
    slug = name.lower().replace(" ", "-")
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        )
    except FileNotFoundError:  # a machine without git (the GPU machines' image)
        sha = subprocess.CompletedProcess([], 1, os.environ.get("FENGSHEN_GIT_SHA", ""), "")
    result = {
        "device": slug, "date": dt.date.today().isoformat(), "git_sha": sha.stdout.strip() or None,
        "config": cfg, "dtype": dtype_name, "peak_bf16_tflops": peak, "hbm_gbps": bw,
        "scoring": scoring, "generation": generation, "pipeline": pipeline,
        "load": {"seconds": load_s}, "memory": {"peak_gb": peak_gb, "fits_24gb": _fits_24gb(scoring, generation)},
        "note": "peak_bf16_tflops/hbm_gbps hold the float32 matmul peak and DRAM copy bandwidth on CPU" if quick else "",
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{slug}-{dt.date.today().strftime('%Y%m%d')}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    write_table(out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
