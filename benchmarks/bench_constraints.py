"""Constrained generation's cost: token masks per decode step at 256 sequences over a GPT2-sized vocabulary,
next to the decode step they serve, and a constrained generate against the same rows unconstrained on the
small model, in one run (a benchmark, never a test).

    python benchmarks/bench_constraints.py            # ~3 min on 2 cores
    python benchmarks/bench_constraints.py --quick    # a smoke test

Vocabulary: no GPT2 tokenizer can be downloaded here, so a byte-level BPE of GPT2's size (50,257 tokens, the
model's 50,304 rows) is built from random merges over GPT2's byte alphabet, weighted to letters, digits and
leading spaces; its tokens are 1 to 12 bytes long like GPT2's. The mask cost depends on the vocabulary's size
and its tokens' bytes, not on what the merges mean.

masks      256 matchers per constraint kind (JSON Schema of a record, choice, regex), each fed a random allowed
           token per step for 48 steps; per step: the time to fill all 256 masks (llguidance's executor with
           1 and 2 threads), against the H200's GPT2-3.5B decode step at batch 256 (19.5 ms:
           benchmarks/results/nvidia-h200-20261129.json, 13,122 tok/s) and this CPU's extrapolated one
           (results/sampler-cpu-2t-20261126.json). The engine fills masks while the model runs the step.
overlapped the engine's mask path (engine/masks.Constraints: apply, sample, feed, start the next fill) beside a
           19.5 ms sleep standing for the H200's step (a CUDA-graph decode leaves the host idle): the time `apply`
           waits for masks per step (the part of the fill not hidden behind the model), and the CPU time of
           applying them (an upper bound: on the GPU the unpack and masked fill are device kernels).
job        the small model (CPU_SMALL, a byte-level BPE of its 8,192 tokens), 256 rows of mixed prompts,
           sampling at t=0.8: unconstrained (limit 48, EOS on) vs a JSON Schema record vs a choice label; output
           tokens/s, wall, the time sampling waited for masks, and how many samples were valid.
Writes benchmarks/results/constraints-<device>-<yyyymmdd>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import CPU_SMALL, build  # noqa: E402
from benchmarks.bench_generate import _provenance  # noqa: E402

H200_STEP_MS_256 = 256 / 13121.811325865407 * 1e3  # nvidia-h200-20261129.json, generation.per_batch_size.256
RECORD = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Beijing", "Shanghai", "Shenzhen", "Hangzhou"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    },
    "required": ["name", "age", "city"],
}
LABELS = ["positive", "negative", "neutral", "mixed"]
EOS = "<|endoftext|>"


def synthetic_bpe(vocab_size: int, seed: int = 0):
    """A byte-level BPE tokenizer (`tokenizers`) of `vocab_size` tokens, EOS last, from random merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    rng = np.random.default_rng(seed)
    common = [c for c in byte_chars if c.isalnum() and c.isascii()] + ["Ġ"] * 20
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    merges, tokens = [], list(vocab)
    while len(vocab) < vocab_size - 1:
        a = rng.choice(common) if rng.random() < 0.5 else tokens[int(rng.integers(len(tokens)))]
        b = rng.choice(common) if rng.random() < 0.7 else tokens[int(rng.integers(len(tokens)))]
        if "Ġ" in b[:1] or len(a) + len(b) > 12 or (a + b) in vocab:
            continue
        vocab[a + b] = len(vocab)
        merges.append((a, b))
        tokens.append(a + b)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(EOS, special=True)])
    from fengshen_batch.model.tokenizer import GPT2TextTokenizer

    return GPT2TextTokenizer(tk, EOS)


def mask_cost(tokenizer, model_vocab: int, rows: int, steps: int, threads: int) -> dict:
    from fengshen_batch.constraints import Constraint, build

    backend = build("llguidance", tokenizer, model_vocab, tokenizer.eos_token_id)
    import llguidance

    backend.executor = llguidance.LLExecutor(num_threads=threads)
    out = {}
    rng = np.random.default_rng(1)
    kinds = {"json_schema": Constraint(json_schema=RECORD), "choice": Constraint(choice=LABELS),
             "regex": Constraint(regex=r"[A-Z][a-z]{2,10}( [a-z]{2,10}){0,6}\.")}  # fmt: skip
    for name, c in kinds.items():
        matchers = [backend.matcher(c) for _ in range(rows)]
        bits = torch.zeros(rows, (model_vocab + 31) // 32, dtype=torch.int32)
        times, live = [], list(range(rows))
        for _ in range(steps):
            if not live:
                break
            t0 = time.perf_counter()
            backend.fill([matchers[i] for i in live], live, bits)
            times.append((time.perf_counter() - t0) * 1e3 * rows / len(live))  # per 256 rows
            allowed = ((bits[live][:, :, None] >> torch.arange(32)) & 1).view(len(live), -1)[:, :model_vocab]
            still = []
            for row, i in zip(allowed, live, strict=True):
                ids = row.nonzero().squeeze(1).tolist()
                tok = int(rng.choice(ids))
                if tok != tokenizer.eos_token_id and matchers[i].consume(tok) and not matchers[i].stopped():
                    still.append(i)
            live = still
        out[name] = {"fill_ms_per_step_mean": float(np.mean(times)), "fill_ms_per_step_median": float(np.median(times)),
                     "fill_ms_per_step_p90": float(np.quantile(times, 0.9)), "steps": len(times)}  # fmt: skip
    return out


def overlapped(tokenizer, model_vocab: int, rows: int, steps: int, threads: int, step_ms: float) -> dict:
    """The engine's own mask path (engine/masks.Constraints) beside a model step that leaves the host idle, as
    a CUDA-graph decode on the H200 does: per step, `apply` (wait for the fill started a step earlier, then
    mask the logits), sample, feed the matchers, `start` the next fill, and a sleep of `step_ms` for the model.
    What the fill costs beyond the step is the wait; the first step's masks are filled inline (a sequence's
    first mask, once per sample, as after its prefill)."""
    from types import SimpleNamespace

    import llguidance

    from fengshen_batch.constraints import Constraint
    from fengshen_batch.engine.masks import Constraints

    model = SimpleNamespace(vocab_size=model_vocab, device=torch.device("cpu"))
    replica = SimpleNamespace(model=model, tokenizer=tokenizer, eos_id=tokenizer.eos_token_id)
    kinds = {"json_schema": Constraint(json_schema=RECORD), "choice": Constraint(choice=LABELS),
             "regex": Constraint(regex=r"[A-Z][a-z]{2,10}( [a-z]{2,10}){0,6}\.")}  # fmt: skip
    out, gen = {}, torch.Generator().manual_seed(1)
    for name, c in kinds.items():
        cons = Constraints(replica, rows, "llguidance")
        assert cons.error(c) is None
        cons.backend.executor = llguidance.LLExecutor(num_threads=threads)
        live = [SimpleNamespace(slot=i, matcher=cons.backend.matcher(c)) for i in range(rows)]
        waits, applies = [], []
        for _ in range(steps):
            if not live:
                break
            raw = torch.randn(len(live), model_vocab, generator=gen)
            t0, w0 = time.perf_counter(), cons.fill_seconds
            masked = cons.apply(raw, live)
            total = time.perf_counter() - t0
            waits.append((cons.fill_seconds - w0) * 1e3)
            applies.append((total - (cons.fill_seconds - w0)) * 1e3)
            toks = (
                (masked - torch.log(-torch.log(torch.rand(masked.shape, generator=gen)))).argmax(-1).tolist()
            )
            live = [s for s, t in zip(live, toks, strict=True) if not cons.feed(s, t, ended=False)]
            cons.start(live)
            time.sleep(step_ms / 1e3)  # the model's step: the device works, the host waits
        cons.wait()
        steady = waits[1:] or [0.0]
        out[name] = {"first_step_fill_ms": waits[0], "wait_ms_per_step_mean": float(np.mean(steady)),
                     "wait_ms_per_step_p90": float(np.quantile(steady, 0.9)),
                     "wait_share_of_step": float(np.mean(steady)) / step_ms,
                     "apply_ms_per_step_mean_cpu": float(np.mean(applies)), "steps": len(waits)}  # fmt: skip
    return out


def job(replica, rows: int, quick: bool) -> dict:
    from fengshen_batch.constraints import Constraint
    from fengshen_batch.engine.llm_engine import LLMEngine
    from fengshen_batch.kinds.generation import generate_tokens
    from fengshen_batch.params import EngineParams, GenerateParams

    rng = np.random.default_rng(2)
    V = replica.model.vocab_size
    prompts = [
        rng.integers(1, V - 1, int(n)).tolist() for n in np.exp(rng.uniform(np.log(16), np.log(128), rows))
    ]
    ids = [f"r{i}" for i in range(rows)]
    out = {}
    for name, c in (("unconstrained", None), ("json_schema", Constraint(json_schema=RECORD)),
                    ("choice", Constraint(choice=LABELS))):  # fmt: skip
        params = GenerateParams(max_new_tokens=48, temperature=0.8, top_p=0.95, seed=3, constraint=c)
        engine = LLMEngine(replica, params, EngineParams(max_num_seqs=128))
        generate_tokens(replica, prompts[:4], ids[:4], params, engine=engine)  # warm-up: compile, backend
        engine.stats.mask_wait_seconds = engine.constraints.fill_seconds = 0.0
        t0 = time.perf_counter()
        res = generate_tokens(replica, prompts, ids, params, engine=engine)
        wall = time.perf_counter() - t0
        samples = [r[0] for r in res]
        tokens = sum(s.generated_tokens for s in samples)
        out[name] = {"wall_s": wall, "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
                     "mask_wait_s": engine.constraints.fill_seconds, "decode_steps": engine.stats.decode_steps,
                     "finish_reasons": {k: sum(s.finish_reason == k for s in samples) for k in ("stop", "length")},
                     "satisfied": None if c is None else sum(bool(s.constraint_satisfied) for s in samples)}  # fmt: skip
        print(f"  {name}: {wall:.1f}s, {tokens / wall:.0f} tok/s, mask wait {out[name]['mask_wait_s']:.2f}s, "
              f"satisfied {out[name]['satisfied']} of {rows}", flush=True)  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    torch.manual_seed(0)
    device = torch.device("cpu")
    res = {**_provenance(device), "h200_decode_step_ms_256": H200_STEP_MS_256}
    sampler = json.loads((ROOT / "benchmarks/results/sampler-cpu-2t-20261126.json").read_text())
    cpu_step = sampler["sampling_at_256_35b_shape"]["decode_model_ms_30_layers_extrapolated"]
    res["cpu_decode_step_ms_256_extrapolated"] = cpu_step

    t0 = time.perf_counter()
    big = synthetic_bpe(50257)
    res["vocab_build_s"] = time.perf_counter() - t0
    res["masks"] = {}
    for threads in (1, 2):
        m = mask_cost(big, 50304, 256, 12 if args.quick else 48, threads)
        for v in m.values():
            v["share_of_h200_step"] = v["fill_ms_per_step_mean"] / H200_STEP_MS_256
            v["share_of_cpu_step"] = v["fill_ms_per_step_mean"] / cpu_step
        res["masks"][f"{threads}_threads"] = m
        print(f"masks, {threads} threads:", json.dumps(m), flush=True)

    res["overlapped_h200_step"] = {}
    for threads in (1, 2):
        m = overlapped(big, 50304, 256, 12 if args.quick else 48, threads, H200_STEP_MS_256)
        res["overlapped_h200_step"][f"{threads}_threads"] = m
        print(f"masks beside a {H200_STEP_MS_256:.1f} ms step, {threads} threads:", json.dumps(m), flush=True)

    replica = build(CPU_SMALL, device, torch.float32)
    replica.tokenizer, replica.eos_id = synthetic_bpe(CPU_SMALL["vocab_size"]), CPU_SMALL["vocab_size"] - 1
    res["job"] = job(replica, 32 if args.quick else 256, args.quick)
    base = res["job"]["unconstrained"]["output_tokens_per_s"]
    for k in ("json_schema", "choice"):
        res["job"][f"{k}_vs_unconstrained_tokens_per_s"] = res["job"][k]["output_tokens_per_s"] / base
    path = Path(args.out) / f"constraints-{res['device']}-{dt.date.today():%Y%m%d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
