"""Logit processing and reproducible sampling, one row per sequence.

Reproducibility: each draw uses one uniform number, a counter-based hash of (sample key, step) computed on the
device (the key itself hashes the job seed, the row id and the sample index). A sample therefore depends only
on the seed, the row id and the sample index: never on the batch, the order, when it was admitted, the rows
beside it or the number of actors. Drawing needs no generator state, no host sync and no per-row launches.

Drawing is inverse-CDF sampling: the uniform picks a token from the cumulative probabilities of the warped
distribution, most likely token first (plain temperature sampling: in vocabulary order). So one random number
per row, not one per vocabulary entry. With top-p alone, only the `CANDIDATES` most likely tokens are
found (a partial top-k, not a sort of the vocabulary) and the draw is made among them; it equals the
full-vocabulary draw whenever the nucleus lies within the candidates. A row whose nucleus does not (a very
flat distribution) is flagged, and the engine redraws it with `sample_full`: exact either way.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..params import GenerateParams

CANDIDATES = 256  # top-p candidates per row before the exact fallback is needed

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


def uniform(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """(B,) float64 uniforms in (0, 1), a pure function of (key, step): keys, steps (B,) int64."""
    bits = _shr(_splitmix64(keys ^ _splitmix64(steps)), 11)  # 53 random bits
    return (bits.double() + 0.5) * 2.0**-53


def penalize(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """Repetition penalty as transformers applies it; seen: (B, V) bool, prompt and output tokens."""
    if penalty == 1.0 or seen is None:
        return logits
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def _first_at_or_above(cum: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, 1) index of the first entry of each row of `cum` (B, K) that is >= x (B, 1), at most K - 1."""
    return torch.searchsorted(cum, x).clamp_(max=cum.shape[-1] - 1)


def _draw(
    probs: torch.Tensor, values: torch.Tensor, u: torch.Tensor, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse-CDF draw from the probabilities `values` (B, K), most likely first: the K largest of `probs`
    (B, V), or all of them. Top-p keeps ranks up to the first whose cumulative mass reaches top_p (at least one
    token), as transformers' TopPLogitsWarper does. Returns (tokens (B,), the K values' total mass (B,)).

    The token is named by its probability, not by a sort's indices: the drawn rank's value, and among tokens
    of exactly that probability the one a stable sort would put there (lowest vocabulary index first). So the
    candidates' partial top-k and the full sort give the same token for the same draw, ties included, and a
    sort needs no indices (on CPU, values alone sort four times faster)."""
    cum = values.double().cumsum(-1)  # (B, K); float64: exact enough over 50k small terms
    last = _first_at_or_above(cum, cum.new_full((len(cum), 1), top_p)) if top_p < 1.0 else None
    total = cum[:, -1:] if last is None else cum.gather(1, last)  # (B, 1) the kept mass
    rank = _first_at_or_above(cum, u[:, None] * total)  # (B, 1) first cum >= target: inside the kept ranks
    if last is not None:
        rank = torch.minimum(rank, last)
    value = values.gather(1, rank)  # (B, 1)
    # (B, 1) place among the tokens of that value: rank minus how many values are larger, found by bisecting
    # the ascending copy (an O(B log K) search where a (B, K) compare and sum cost a millisecond a step)
    larger = values.shape[-1] - torch.searchsorted(values.flip(-1), value, side="right")
    tie = rank - larger
    same = probs == value  # (B, V)
    if probs.device.type != "cpu":  # no host sync on a GPU: the general form for every row
        same &= same.cumsum(-1) == tie + 1
        return same.int().argmax(-1), cum[:, -1]
    # CPU: the first token of that value, and the (tie + 1)-th only on the rows whose value repeats above it
    # (in a flat float32 distribution most steps have a few: a (B, V) cumsum for them all cost 5 ms a step)
    tokens = same.view(torch.uint8).argmax(-1)  # (B,) first index of the maximum, as argmax promises
    tied = tie.squeeze(1).nonzero().squeeze(1)  # (T,)
    if len(tied):
        sub = same[tied]  # (T, V)
        sub &= sub.cumsum(-1) == tie[tied] + 1
        tokens[tied] = sub.view(torch.uint8).argmax(-1)
    return tokens, cum[:, -1]


def sample_full(logits, keys, steps, params: GenerateParams, u: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) tokens drawn over the whole vocabulary (the exact fallback, and plain temperature sampling);
    `u` (B,) overrides the keyed uniforms (tests)."""
    probs = (logits / params.temperature).softmax(-1)  # (B, V)
    u = uniform(keys, steps) if u is None else u
    if params.top_p >= 1.0 and not params.top_k:  # no filter: vocabulary order, no sort
        cum = probs.double().cumsum(-1)
        return _first_at_or_above(cum, u[:, None] * cum[:, -1:]).squeeze(1)
    if params.top_k and params.top_k < probs.shape[-1]:
        values = torch.topk(probs, params.top_k, dim=-1).values
        probs = probs / values.sum(-1, keepdim=True)  # top-p sees the top-k distribution
        return _draw(probs, values / values.sum(-1, keepdim=True), u, params.top_p)[0]
    return _draw(probs, _sort_descending(probs), u, params.top_p)[0]


def _sort_descending(probs: torch.Tensor) -> torch.Tensor:
    """Float32 probabilities (B, V) sorted most likely first. On CPU numpy sorts the values' int32 bit
    patterns (for non-negative floats they order the same) with its vectorised sort: 2.6 ms at (128, 8192)
    where torch's sort, which always also returns indices, takes 23 ms; it was the largest single cost of a
    decode step where distributions are flat enough to need the full sort."""
    if probs.device.type != "cpu" or probs.dtype != torch.float32:
        return torch.sort(probs, dim=-1, descending=True).values
    ascending = np.sort(probs.contiguous().view(torch.int32).numpy(), axis=-1)
    return torch.from_numpy(ascending).flip(-1).view(torch.float32)


def sample(
    logits: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor, params: GenerateParams, full: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next tokens (B,) for penalised logits (B, V) float32, and a (B,) bool of rows to redraw with
    `sample_full` (None when every row is exact). `full`: skip the candidates (the caller saw flat
    distributions, where nearly every row would need the redraw)."""
    if not params.sampling:
        return logits.argmax(-1), None
    V = logits.shape[-1]
    if full or params.top_p >= 1.0 or params.top_k or V <= CANDIDATES:
        return sample_full(logits, keys, steps, params), None
    probs = (logits / params.temperature).softmax(-1)
    values = torch.topk(probs, CANDIDATES, dim=-1).values  # (B, CANDIDATES) most likely first
    tokens, mass = _draw(probs, values, uniform(keys, steps), params.top_p)
    return tokens, mass < params.top_p  # the nucleus extends past the candidates: redraw those rows
