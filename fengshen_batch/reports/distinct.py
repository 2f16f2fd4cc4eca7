"""Mergeable distinct counts: how many different samples (or n-grams) a job made, without keeping them all.

Each shard turns its items into stable 64-bit hashes (`stable_hashes`: the same text gives the same hash in
every process and on every node, unlike Python's salted `hash`) and keeps a sketch of them:
- exact while small: the sorted distinct hashes themselves, up to EXACT_LIMIT of them;
- beyond that a HyperLogLog of 2^14 registers (the precision Redis uses), read with Ertl's improved
  estimator ("New cardinality estimation algorithms for HyperLogLog sketches", 2017), which needs no
  empirical bias tables: its standard error is 1.04 / sqrt(2^14) = 0.81% of the distinct count.
Merging is a union of exact sets (while it stays under the limit) or a register-wise max, so shards merge in
any order, and a resumed job's merge equals an uninterrupted one's. The only approximation is the one of
hashing: two different items share a 64-bit hash with odds ~ n^2 / 2^65, nil at corpus sizes.
"""

from __future__ import annotations

import base64
import hashlib
import math
import zlib
from collections.abc import Iterable

import numpy as np

P = 14  # HyperLogLog precision: 2^P registers
M = 1 << P
Q = 64 - P  # hash bits left after the register index
# Distinct hashes kept as they are (8 KiB, about a compressed HyperLogLog's size) before a sketch turns into
# registers.
EXACT_LIMIT = 1024
RELATIVE_ERROR = 1.04 / math.sqrt(M)  # the HyperLogLog's standard error, relative to the distinct count
_MASK = np.uint64((1 << Q) - 1)


def stable_hashes(items: Iterable[str]) -> np.ndarray:
    """uint64 hashes of strings (the first 8 bytes of BLAKE2b), equal in every process."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") for s in items],
        dtype=np.uint64,
    )


def mix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A hash of the pairs (a[i], b[i]) of uint64 hashes (an n-gram's from its units'): splitmix64's
    finaliser over a * odd + b, vectorised; order matters, (a, b) and (b, a) differ."""
    with np.errstate(over="ignore"):
        z = a * np.uint64(0x9E3779B97F4A7C15) + b
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(a.tobytes(), 6)).decode()


def _unb64(s: str, dtype) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(s)), dtype=dtype)


def _registers(hashes: np.ndarray) -> np.ndarray:
    """HyperLogLog registers (uint8 [M]) of uint64 hashes: the top P bits pick a register, which keeps the
    largest rank (1 + leading zeros) of the remaining Q bits seen."""
    index = (hashes >> np.uint64(Q)).astype(np.int64)
    rest = hashes & _MASK  # < 2^50: exact as float64, so floor(log2) is exact
    rank = np.full(len(hashes), Q + 1, dtype=np.uint8)
    nonzero = rest > 0
    rank[nonzero] = (Q - np.floor(np.log2(rest[nonzero].astype(np.float64)))).astype(np.uint8)
    registers = np.zeros(M, dtype=np.uint8)
    np.maximum.at(registers, index, rank)
    return registers


def sketch(hashes: np.ndarray) -> dict:
    """The sketch of a set of uint64 hashes: {"exact": ...} or {"hll": ...} (strings, for JSON)."""
    distinct = np.unique(hashes)
    if len(distinct) <= EXACT_LIMIT:
        return {"exact": _b64(distinct)}
    return {"hll": _b64(_registers(distinct))}


def merge(sketches: list[dict]) -> dict:
    """The sketch of the union of the sketches' sets."""
    exact = [_unb64(s["exact"], np.uint64) for s in sketches if "exact" in s]
    union = np.unique(np.concatenate(exact)) if exact else np.zeros(0, np.uint64)
    hll = [_unb64(s["hll"], np.uint8) for s in sketches if "hll" in s]
    if not hll and len(union) <= EXACT_LIMIT:
        return {"exact": _b64(union)}
    return {"hll": _b64(np.maximum.reduce([_registers(union), *hll]))}


def count(s: dict) -> float:
    """The distinct count: exact from an exact sketch, Ertl's improved estimate from registers."""
    if "exact" in s:
        return float(len(_unb64(s["exact"], np.uint64)))
    c = np.bincount(_unb64(s["hll"], np.uint8), minlength=Q + 2).astype(np.float64)
    z = M * _tau(1 - c[Q + 1] / M)
    for k in range(Q, 0, -1):
        z = 0.5 * (z + c[k])
    z += M * _sigma(c[0] / M)
    return M * M / (2 * math.log(2) * z)


def is_exact(s: dict) -> bool:
    return "exact" in s


def _sigma(x: float) -> float:
    if x == 1.0:
        return math.inf
    y, z = 1.0, x
    while True:
        x *= x
        previous, z = z, z + x * y
        y += y
        if z == previous:
            return z


def _tau(x: float) -> float:
    if x in (0.0, 1.0):
        return 0.0
    y, z = 1.0, 1.0 - x
    while True:
        x = math.sqrt(x)
        previous = z
        y *= 0.5
        z -= (1 - x) ** 2 * y
        if z == previous:
            return z / 3
