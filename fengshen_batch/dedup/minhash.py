"""MinHash signatures of texts, in numpy: shingles per script, one vectorised pass per batch of texts.

A JSON record (a sample that parses as a JSON object or array: a constrained job's output) is compared by
its values alone, never its keys: records of one schema share every key, and over short values the keys
would make unrelated records look alike (the templated-output over-merging other curation tools report).
A text is normalised (NFKC, lower case, punctuation and whitespace dropped), then cut into shingles of
`ngram` units: characters where most of its letters are CJK (Chinese has no spaces to split words on, and a
word shingle would be the whole sentence), words elsewhere. A text shorter than `ngram` units is one
shingle. Every hash is a fixed function of the shingles and the seed (rensa's seeded MinHash over their
UTF-8), never Python's per-process `hash`: signatures written by different actors, machines and nights
compare.

Signatures are `num_perm` uint32 values; the estimated Jaccard of two texts is the fraction of positions at
which their signatures agree. LSH bands hash `num_perm / bands` consecutive values each.
"""

from __future__ import annotations

import json
import re
import unicodedata

import numpy as np
import pyarrow as pa
import rensa

_WORD = re.compile(r"\w+")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
# What makes signatures comparable besides the spec's settings: this module's shingles and rensa's MinHash.
# A change to either is a new ALGORITHM: outputs signed by the old one are refused as `against`.
ALGORITHM = f"shingles-3/rensa-RMinHash-{rensa.RMinHash.ALGORITHM_VERSION}"


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def record_values(text: str) -> str:
    """A JSON object's or array's leaf values (strings, numbers, booleans; document order), one per line;
    any other text (a record cut at its token limit included) as it is."""
    if text.lstrip()[:1] not in ("{", "["):
        return text
    try:
        record = json.loads(text)
    except ValueError:
        return text
    values: list[str] = []
    stack = [record]
    while stack:  # depth first, in document order
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(reversed(list(value.values())))
        elif isinstance(value, list):
            stack.extend(reversed(value))
        elif value is not None:
            values.append(json.dumps(value) if isinstance(value, bool) else str(value))
    return "\n".join(values)


def _words(text: str) -> list[str]:
    """The text's words after NFKC and lower-casing: runs of letters and digits (punctuation dropped)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def _mostly_cjk(words: list[str]) -> bool:
    """At least half of the letters are CJK (a Chinese sentence with an English name in it)."""
    joined = "".join(words)
    return bool(joined) and len(_CJK.findall(joined)) * 2 >= len(joined)


def is_cjk(text: str) -> bool:
    return _mostly_cjk(_words(text))


def shingles(text: str, ngram: int) -> list[str]:
    """The text's n-grams of units: characters of its words where it is mostly CJK (`\\w` keeps CJK
    characters, drops punctuation), else words joined by a space; a text shorter than `ngram` units (the
    empty text too) is one shingle. A JSON record's shingles are its values' (`record_values`)."""
    words = _words(record_values(text))
    if _mostly_cjk(words):
        chars = "".join(words)
        return [chars[i : i + ngram] for i in range(len(chars) - ngram + 1)] or [chars]
    return [" ".join(words[i : i + ngram]) for i in range(len(words) - ngram + 1)] or [" ".join(words)]


def signatures(texts: list[str], ngram: int, num_perm: int, seed: int = 0) -> np.ndarray:
    """(N, num_perm) uint32 MinHash signatures of `texts`: our shingles through rensa's MinHash (Rust: its
    string hashing and permutations cost 13 us a sample, numpy's multiply-shift permutations alone 80;
    benchmarks/bench_dedup.py)."""
    if not texts:
        return np.zeros((0, num_perm), np.uint32)
    matrix = rensa.RMinHash.digest_matrix_from_token_sets([shingles(t, ngram) for t in texts], num_perm, seed)
    return np.array(matrix.to_rows(), dtype=np.uint32).reshape(len(texts), num_perm)


def band_keys(sigs: np.ndarray, bands: int) -> np.ndarray:
    """(N, bands) int64: each band's rows hashed to 56 bits, the band's index in the top 8 (equal keys: a
    candidate pair; keys of different bands never equal)."""
    n, p = sigs.shape
    rows = p // bands
    v = sigs.astype(np.uint64).reshape(n, bands, rows)
    acc = np.zeros((n, bands), np.uint64)
    for j in range(rows):
        acc += _mix(v[:, :, j] ^ (np.uint64(j + 1) << np.uint64(40)))
    tag = np.arange(bands, dtype=np.uint64) << np.uint64(56)
    return ((_mix(acc) & np.uint64(2**56 - 1)) | tag[None, :]).view(np.int64)


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(M,) float64: the agreeing fraction of each pair of rows of two (M, num_perm) signature arrays."""
    return (a == b).mean(axis=1)


def exact_jaccard(x: str, y: str, ngram: int) -> float:
    """The Jaccard of two texts' shingle sets (what the signatures estimate; benchmarks and tests)."""
    sx, sy = set(shingles(x, ngram)), set(shingles(y, ngram))
    return len(sx & sy) / len(sx | sy)


# A signature file's columns (OUTPUT/signatures/part-000042.parquet, one row per row of data/part-000042):
# the sample's node key (clusters.py), its signature as num_perm little-endian uint32 in one binary value,
# its NLL per token (lowest_nll), its length in characters (longest) and the start of its text (the
# report's example clusters, without reading the data back).
PREVIEW_CHARS = 160


def signature_table(shard: int, texts: list, nll: list, settings: dict) -> pa.Table:
    """One shard's signature file: `texts` (None for a sample with no text: one empty shingle) in data-file
    order, `nll` per token of each (None: unknown)."""
    from .clusters import node_key

    texts = [t or "" for t in texts]
    sigs = signatures(texts, settings["ngram"], settings["num_perm"], settings["seed"])
    width = sigs.shape[1] * 4
    return pa.table(
        {
            "key": node_key(0, shard, np.arange(len(texts))),
            "sig": pa.array([sigs[i].astype("<u4").tobytes() for i in range(len(texts))], pa.binary(width)),
            "nll": pa.array(nll, pa.float64()),
            "length": pa.array([len(t) for t in texts], pa.int32()),
            "preview": pa.array([t[:PREVIEW_CHARS] for t in texts], pa.string()),
        }
    )


def sig_array(column: pa.ChunkedArray | pa.Array, num_perm: int) -> np.ndarray:
    """(N, num_perm) uint32 signatures from a signature file's `sig` column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if len(column) == 0:
        return np.zeros((0, num_perm), np.uint32)
    data = np.frombuffer(column.buffers()[1], dtype="<u4", offset=column.offset * num_perm * 4)
    return data[: len(column) * num_perm].reshape(len(column), num_perm)
