"""Measured rates the `plan` command estimates wall time from, each with the benchmark run it comes from.

Rates are for the benchmark's model shape; a job's model is scaled by its non-embedding parameters (decode
reads them once per step, prefill and scoring compute with them per token), a first-order estimate. Start-up
(Ray, fetching and loading the model: tens of seconds to minutes) is not in it.
"""

from __future__ import annotations

GPT2_35B = dict(n_embd=3072, n_layer=30)
CPU_SMALL = dict(n_embd=256, n_layer=4)

RATES = {
    "gpu": {
        "device": "one NVIDIA H200 per actor, GPT2-3.5B shape in bf16",
        "source": "benchmarks/results/nvidia-h200-20261129.json and gpu-partial-nvidia-h200-20261129.json",
        "shape": GPT2_35B,
        "score_tokens_per_s": 57_738,  # scoring.mix_tokens_per_s (mixed lengths)
        "prefill_tokens_per_s": 53_171,  # few-shot, caching off: 420,055 prompt tokens in 7.9 s of prefill
        "decode_tokens_per_s": 7_285,  # mixed workload at 256 slots, EOS on
    },
    "cpu": {
        "device": "2 CPU cores per actor, the benchmarks' small GPT2 (4 x 256) in float32",
        "source": "benchmarks/results/cpu-2t-20261122.json and generate-cpu-2t-20261203.json",
        "shape": CPU_SMALL,
        "score_tokens_per_s": 4_511,
        "prefill_tokens_per_s": 13_460,  # prefix-cpu-2t-20261203.json: few-shot, caching off
        "decode_tokens_per_s": 3_062,  # mixed workload, best max_num_seqs
    },
}


def scale(config: dict, shape: dict) -> float:
    """How many times the benchmark's work per token the job's model does (non-embedding parameters)."""
    d, layers = config.get("n_embd") or shape["n_embd"], config.get("n_layer") or shape["n_layer"]
    return (d * d * layers) / (shape["n_embd"] ** 2 * shape["n_layer"])
