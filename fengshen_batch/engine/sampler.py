"""Logit processing and reproducible sampling, one row per sequence.

Reproducibility: the random number for (sample key, step, vocab entry) is a counter-based hash of the three
(the key itself hashes the job seed, the row id and the sample index), computed on the device. A sample
therefore depends only on the seed, the row id and the sample index: never on the batch, the order, when it
was admitted, the rows beside it or the number of actors. Drawing needs no generator state, no host sync and
no per-row kernel launches. Sampling is the Gumbel-max trick: argmax(logits + Gumbel noise) is a draw from
softmax(logits).

Cost: with top-k or top-p, only candidate tokens get noise. Top-p works on the `CANDIDATES` most likely
tokens (a partial top-k, not a sort of the vocabulary); since the noise is keyed by vocab id, the draw equals
the full-vocabulary computation whenever the nucleus lies within the candidates. A row whose nucleus does
not (a very flat distribution) is flagged, and the engine redraws it with the full path: exact either way.
"""

from __future__ import annotations

import hashlib

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


def gumbel(keys: torch.Tensor, steps: torch.Tensor, vocab_ids: torch.Tensor) -> torch.Tensor:
    """(B, K) Gumbel noise for the given vocab ids (B, K) (or (K,) shared), a pure function of
    (key, step, vocab id): keys, steps (B,) int64."""
    stream = _splitmix64(keys ^ _splitmix64(steps))[:, None]  # (B, 1)
    bits = _shr(_splitmix64(stream + vocab_ids), 40)  # 24 random bits, (B, K)
    u = (bits.float() + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1)
    return -torch.log(-torch.log(u))


def penalize(logits: torch.Tensor, seen: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """Repetition penalty as transformers applies it; seen: (B, V) bool, prompt and output tokens."""
    if penalty == 1.0 or seen is None:
        return logits
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def warp_full(logits: torch.Tensor, params: GenerateParams) -> torch.Tensor:
    """Temperature, top-k and top-p over the whole vocabulary, as transformers' warpers do them (the exact
    reference path; (B, V) -> (B, V) with removed tokens at -inf)."""
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


def sample_full(logits, keys, steps, params: GenerateParams) -> torch.Tensor:
    """(B,) tokens drawn from the fully warped distribution (the fallback, and the no-filter case)."""
    warped = warp_full(logits, params)
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    return (warped + gumbel(keys, steps, vocab)).argmax(-1)


def sample(
    logits: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor, params: GenerateParams
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next tokens (B,) for penalised logits (B, V) float32, and a (B,) bool of rows to redraw with
    `sample_full` (None when every row is exact)."""
    if not params.sampling:
        return logits.argmax(-1), None
    V = logits.shape[-1]
    top_k = params.top_k if params.top_k and params.top_k < V else 0
    if not top_k and params.top_p >= 1.0:
        return sample_full(logits, keys, steps, params), None
    x = logits / params.temperature
    K = top_k or min(V, CANDIDATES)
    vals, idx = torch.topk(x, K, dim=-1)  # (B, K), most likely first
    redraw = None
    if params.top_p < 1.0:
        # top-p sees the distribution after top-k (over the candidates) or the whole one.
        lse = (vals if top_k else x).logsumexp(-1, keepdim=True)  # (B, 1)
        p = (vals - lse).exp()
        cum = p.cumsum(-1)
        keep = cum - p < params.top_p  # the mass before a token has not reached top_p yet
        if not top_k and K < V:
            redraw = cum[:, -1] < params.top_p  # the nucleus extends past the candidates
        vals = vals.masked_fill(~keep, float("-inf"))
    tokens = idx.gather(1, (vals + gumbel(keys, steps, idx)).argmax(-1, keepdim=True)).squeeze(1)
    return tokens, redraw
