"""Logit processing and reproducible sampling for the decode loop.

Reproducibility: the random numbers for (row id, sample index, step, vocab entry) come from a counter-based
hash of those four values and the job seed, computed on the device. A sample therefore depends only on the
seed, the row id and the sample index, never on which rows share its batch, the batch size, the order or the
number of actors; and drawing needs no generator state, no host sync and no per-row kernel launches.
Sampling is the Gumbel-max trick: argmax(logits + Gumbel noise) is a draw from softmax(logits).
"""

from __future__ import annotations

import hashlib

import torch

from .params import GenerateParams

_M64 = 1 << 64


def _i64(x: int) -> int:
    """A uint64 constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    x %= _M64
    return x - _M64 if x >= 1 << 63 else x


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    # int64 multiplication wraps modulo 2^64 on CPU and CUDA, as uint64 would.
    x = x + _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def sample_key(seed: int, row_id: str, sample_index: int) -> int:
    """A 64-bit key naming one sample stream: the same (seed, row id, index) always gives the same key."""
    digest = hashlib.blake2b(f"{seed}\x00{row_id}\x00{sample_index}".encode(), digest_size=8).digest()
    return _i64(int.from_bytes(digest, "little"))


def uniform(keys: torch.Tensor, step: int | torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, V) float32 uniforms in (0, 1), a pure function of (key, step, vocab index)."""
    stream = _splitmix64(keys[:, None] ^ _splitmix64(torch.as_tensor(step, device=keys.device) + 0))  # (B, 1)
    idx = torch.arange(vocab, device=keys.device, dtype=torch.long)  # (V,)
    bits = _shr(_splitmix64(stream + idx), 40)  # 24 random bits, (B, V)
    return (bits.float() + 0.5) * (1.0 / (1 << 24))


def process_logits(logits: torch.Tensor, seen: torch.Tensor, params: GenerateParams) -> torch.Tensor:
    """Repetition penalty, then temperature, top-k and top-p, as transformers' processors do them.

    logits: (B, V) float32; seen: (B, V) bool, tokens of the prompt (not its padding) and of the output so far.
    """
    if params.repetition_penalty != 1.0:
        penalised = torch.where(
            logits < 0, logits * params.repetition_penalty, logits / params.repetition_penalty
        )
        logits = torch.where(seen, penalised, logits)
    if not params.sampling:
        return logits
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose probability reaches top_p (at least one).
        sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum <= 1 - params.top_p
        remove[:, -1] = False
        logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
    return logits


def choose(logits: torch.Tensor, keys: torch.Tensor, step: int, params: GenerateParams) -> torch.Tensor:
    """Next token per row, (B,): argmax when greedy, else a Gumbel-max draw keyed by (key, step)."""
    if not params.sampling:
        return logits.argmax(-1)
    gumbel = -torch.log(-torch.log(uniform(keys, step, logits.shape[-1])))
    return (logits + gumbel).argmax(-1)
