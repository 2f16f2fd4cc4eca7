"""Near-duplicate dedup (issue 36): is it right, what does it cost per sample, does it stay flat as rows grow?

quality  precision and recall against exact Jaccard on a planted set: families of Chinese and English
         texts (pseudo-sentences from a Zipf-drawn vocabulary, so unrelated texts share common words)
         with 0-10 random edits each, through the job's own Ray tasks at the default settings; and
         the share of pairs clustered per band of exact Jaccard (LSH's S-curve after confirmation)
cost     microseconds per sample: text -> signature (the actor's part; our numpy shingles with rensa's
         MinHash, against numpy's own permutations, datasketch and rensa's own string hashing), and
         the cluster tasks' part; next to the H200's cost of generating the sample at the 3.5B shape
         (results/nvidia-h200-20261129.json: 14,682 generated tokens/s at batch 128)
scale    200k and 2M samples' signature files (5% planted near-copies), the cluster tasks only: wall
         time, and peak RSS per task (each task in a fresh worker process, sampled every 20 ms)

python benchmarks/bench_dedup.py [--scale 200000,2000000] [--out results/dedup-cpu-2c-DATE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fengshen_batch.dedup import minhash
from fengshen_batch.dedup.config import Dedup
from fengshen_batch.io.storage import StorageSpec
from fengshen_batch.tiny_model import SAMPLE_LINES

HERE = Path(__file__).resolve().parent
H200_GENERATED_TOKENS_PER_S = 14681.6  # nvidia-h200-20261129.json, generation at batch 128
ZH_SEED = (
    "".join(SAMPLE_LINES)
    + "今天早上我们在公园里跑步看到很多老人在打太极拳空气非常清新这家餐厅的红烧肉做得特别好吃"
)


def vocabularies(rng: random.Random) -> tuple[list[str], list[str]]:
    zh_chars = sorted({c for c in ZH_SEED if "\u4e00" <= c <= "\u9fff"})
    zh = sorted({a + b for a in zh_chars for b in zh_chars})
    rng.shuffle(zh)
    syll = ["ka", "lo", "mi", "ren", "to", "sa", "vel", "dor", "in", "ex", "pa", "qui", "na", "ter", "mo"]
    en = sorted({"".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(4000)})
    return zh[:3000], en


def sentence(rng: random.Random, vocab: list[str], n: int, zipf: np.ndarray) -> list[str]:
    return [vocab[i] for i in rng.choices(range(len(vocab)), weights=zipf, k=n)]


def edited(rng: random.Random, words: list[str], vocab: list[str], k: int) -> list[str]:
    out = list(words)
    for _ in range(k):  # a substitution, an insertion or a deletion
        op, i = rng.random(), rng.randrange(len(out))
        if op < 0.6:
            out[i] = rng.choice(vocab)
        elif op < 0.8:
            out.insert(i, rng.choice(vocab))
        elif len(out) > 3:
            del out[i]
    return out


def planted(families: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Texts and their family: each family a base text (Chinese or English, 15-60 words) and 1-4 copies
    with 0-10 edits (zero edits: a punctuation-only copy)."""
    rng = random.Random(seed)
    zh, en = vocabularies(rng)
    texts, family = [], []
    for f in range(families):
        vocab, join = (zh, "") if f % 2 == 0 else (en, " ")
        zipf = 1.0 / np.arange(1, len(vocab) + 1)
        base = sentence(rng, vocab, rng.randint(15, 60), zipf)
        members = [base] + [edited(rng, base, vocab, rng.randint(0, 10)) for _ in range(rng.randint(1, 4))]
        for m in members:
            text = join.join(m)
            texts.append(text + rng.choice(["。", "！", ".", "!", ""]))
            family.append(f)
    return texts, family


def write_signatures(folder: Path, texts: list[str], settings: dict, rows: int = 4096) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, lo in enumerate(range(0, len(texts), rows)):
        part = texts[lo : lo + rows]
        table = minhash.signature_table(shard, part, [None] * len(part), settings)
        paths.append(str(folder / f"part-{shard:06d}.parquet"))
        pq.write_table(table, paths[-1])
    return paths


def cluster(paths: list[str], d: Dedup, url: str, options: dict | None = None):
    from fengshen_batch.workers.dedup import near_duplicates

    spec = SimpleNamespace(dedup=d, storage=StorageSpec(), shard_rows=4096)
    ref, figures = near_duplicates(spec, [(url, paths)], options=options)
    import ray

    return ray.get(ref), figures


# ------------------------------------------------------------------------------------------ quality


def quality(tmp: Path, families: int) -> dict:
    texts, family = planted(families)
    d = Dedup()
    paths = write_signatures(tmp / "quality", texts, d.signature_settings())
    t = time.time()
    table, figures = cluster(paths, d, str(tmp / "quality"))
    seconds = time.time() - t
    # keys are (shard << 32 | position) of 4096-row files: back to the text's index
    cluster_of = {}
    for key, c in zip(table.column("key").to_pylist(), table.column("cluster").to_pylist(), strict=True):
        cluster_of[(key >> 32) * 4096 + (key & 0xFFFFFFFF)] = c
    by_family: dict[int, list[int]] = {}
    for i, f in enumerate(family):
        by_family.setdefault(f, []).append(i)
    bands = {b: [0, 0] for b in ("0.0-0.5", "0.5-0.6", "0.6-0.7", "0.7-0.8", "0.8-0.9", "0.9-1.0")}
    tp = fn = fp_within = 0
    for members in by_family.values():
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                i, j = members[x], members[y]
                jac = minhash.exact_jaccard(texts[i], texts[j], d.ngram)
                same = i in cluster_of and cluster_of.get(i) == cluster_of.get(j)
                band = next(b for b in bands if jac < float(b.split("-")[1]) or b == "0.9-1.0")
                bands[band][0] += 1
                bands[band][1] += same
                if jac >= d.threshold:
                    tp += same
                    fn += not same
                else:
                    fp_within += same
    # predicted pairs across families: every same-cluster pair whose texts are of different families
    members_of: dict[int, list[int]] = {}
    for i, c in cluster_of.items():
        members_of.setdefault(c, []).append(i)
    cross = cross_true = 0
    for m in members_of.values():
        for x in range(len(m)):
            for y in range(x + 1, len(m)):
                if family[m[x]] != family[m[y]]:
                    cross += 1
                    cross_true += minhash.exact_jaccard(texts[m[x]], texts[m[y]], d.ngram) >= d.threshold
    rng = random.Random(1)
    background = [minhash.exact_jaccard(texts[a], texts[b], d.ngram)
                  for a, b in (rng.sample(range(len(texts)), 2) for _ in range(20000)) if family[a] != family[b]]  # fmt: skip
    predicted = tp + fp_within + cross
    return {
        "texts": len(texts),
        "families": families,
        "settings": d.model_dump(),
        "pairs_at_or_above_threshold": tp + fn,
        "precision": round((tp + cross_true) / max(1, predicted), 4),
        "recall": round(tp / max(1, tp + fn), 4),
        "clustered_below_threshold_within_family": fp_within,
        "clustered_across_families": cross,
        "unrelated_pairs_exact_jaccard_p99": round(float(np.quantile(background, 0.99)), 4),
        "share_clustered_by_exact_jaccard": {
            b: {"pairs": n, "clustered": round(c / max(1, n), 4)} for b, (n, c) in bands.items()
        },
        "candidate_pairs": figures["candidate_pairs"],
        "confirmed_pairs": figures["confirmed_pairs"],
        "cluster_seconds": round(seconds, 3),
    }


# ------------------------------------------------------------------------------------------ cost


def _numpy_minhash(flat: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """The permutation step in numpy (multiply-shift, min per text): what rensa replaced."""
    rng = np.random.Generator(np.random.PCG64(seed))
    a = rng.integers(0, 2**64, num_perm, dtype=np.uint64, endpoint=False) | np.uint64(1)
    b = rng.integers(0, 2**64, num_perm, dtype=np.uint64, endpoint=False)
    out = np.empty((len(offsets) - 1, num_perm), np.uint32)
    for lo in range(0, len(offsets) - 1, 256):
        hi = min(lo + 256, len(offsets) - 1)
        seg = flat[offsets[lo] : offsets[hi]]
        h = ((seg[:, None] * a[None, :] + b[None, :]) >> np.uint64(32)).astype(np.uint32)
        out[lo:hi] = np.minimum.reduceat(h, (offsets[lo:hi] - offsets[lo]).astype(np.int64), axis=0)
    return out


def cost(texts: list[str], tokens_per_sample: float) -> dict:
    d = Dedup()
    n = len(texts)
    out = {"samples": n}
    t = time.perf_counter()
    grams = [minhash.shingles(x, d.ngram) for x in texts]
    out["ours_shingles_us_per_sample"] = round(1e6 * (time.perf_counter() - t) / n, 1)
    t = time.perf_counter()
    minhash.signatures(texts, d.ngram, d.num_perm, d.seed)
    out["ours_us_per_sample"] = round(1e6 * (time.perf_counter() - t) / n, 1)  # shingles + rensa
    import rensa

    # the hand-written alternative: the same shingles' 64-bit hashes through numpy permutations
    hashed = rensa.RMinHash.hash_token_sets(grams)
    flat = np.concatenate([np.asarray(h, np.uint64) for h in hashed])
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in hashed])]).astype(np.uint64)
    t = time.perf_counter()
    _numpy_minhash(flat, offsets, d.num_perm, d.seed)
    out["numpy_permutations_only_us_per_sample"] = round(1e6 * (time.perf_counter() - t) / n, 1)
    t = time.perf_counter()
    np.array(rensa.RMinHash.digest_matrix_from_token_sets(grams, d.num_perm, d.seed).to_rows())
    out["rensa_hash_and_permutations_us_per_sample"] = round(1e6 * (time.perf_counter() - t) / n, 1)
    from datasketch import MinHash

    m_ = min(n, 2000)
    t = time.perf_counter()
    for g in grams[:m_]:
        m = MinHash(num_perm=d.num_perm, seed=d.seed)
        m.update_batch([x.encode() for x in g])
    out["datasketch_hash_and_permutations_us_per_sample"] = round(1e6 * (time.perf_counter() - t) / m_, 1)
    out["mean_shingles_per_sample"] = round(len(flat) / n, 1)
    out["h200_generation_us_per_sample"] = round(1e6 * tokens_per_sample / H200_GENERATED_TOKENS_PER_S, 1)
    out["generated_tokens_per_sample"] = tokens_per_sample
    return out


# ------------------------------------------------------------------------------------------ scale


class PeakRss:
    """Peak RSS of every Ray worker process seen (each task in its own process: max_calls=1)."""

    def __init__(self):
        import psutil

        self.psutil, self.peak, self.stop = psutil, {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            for p in self.psutil.process_iter(["pid", "cmdline", "memory_info"]):
                cmd = " ".join(p.info["cmdline"] or [])
                name = cmd.split()[0].removeprefix("ray::") if cmd.startswith("ray::") else ""
                if name.endswith("_task"):  # a worker's title while it runs one of the dedup tasks
                    rss = p.info["memory_info"].rss if p.info["memory_info"] else 0
                    key = (name, p.info["pid"])
                    self.peak[key] = max(self.peak.get(key, 0), rss)
            time.sleep(0.02)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def by_task(self) -> dict[str, dict]:
        out: dict[str, list[int]] = {}
        for (name, _), rss in self.peak.items():
            out.setdefault(name, []).append(rss)
        return {k: {"tasks_seen": len(v), "peak_rss_mb_max": round(max(v) / 2**20, 1),
                    "peak_rss_mb_median": round(float(np.median(v)) / 2**20, 1)} for k, v in sorted(out.items())}  # fmt: skip


def synthetic_signatures(folder: Path, n: int, d: Dedup, dup_share: float = 0.05, rows: int = 4096) -> int:
    """n samples' signature files: random signatures, `dup_share` of them a near-copy (10 of 128 values
    changed: estimated Jaccard 0.92) of a sample earlier in the same or an earlier file."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    planted = 0
    previous = None
    for shard, lo in enumerate(range(0, n, rows)):
        m = min(rows, n - lo)
        sigs = rng.integers(0, 2**32, (m, d.num_perm), dtype=np.uint32)
        before = 0 if previous is None else len(previous)
        for c in np.flatnonzero(rng.random(m) < dup_share):
            if before + c == 0:
                continue
            r = rng.integers(0, before + c)  # a row of the previous file, or one before it in this one
            sigs[c] = previous[r] if r < before else sigs[r - before]
            sigs[c, rng.choice(d.num_perm, 10, replace=False)] = rng.integers(0, 2**32, 10, dtype=np.uint32)
            planted += 1
        previous = sigs
        table = pa.table({
            "key": (np.int64(shard) << 32) | np.arange(m, dtype=np.int64),
            "sig": pa.array([s.astype("<u4").tobytes() for s in sigs], pa.binary(d.num_perm * 4)),
            "nll": pa.array(rng.random(m)), "length": pa.array(rng.integers(10, 500, m), pa.int32()),
            "preview": pa.array([""] * m),
        })  # fmt: skip
        pq.write_table(table, folder / f"part-{shard:06d}.parquet")
    return planted


def scale(tmp: Path, n: int) -> dict:
    d = Dedup()
    folder = tmp / f"scale-{n}"
    t = time.time()
    planted = synthetic_signatures(folder, n, d)
    write_s = time.time() - t
    paths = sorted(str(p) for p in folder.glob("part-*.parquet"))
    with PeakRss() as rss:
        t = time.time()
        table, figures = cluster(paths, d, str(folder), options={"max_calls": 1})
        seconds = time.time() - t
    found = int((~table.column("keep").to_numpy(zero_copy_only=False)).sum())
    return {
        "samples": n,
        "files": len(paths),
        "planted_copies": planted,
        "removed": found,
        "candidate_pairs": figures["candidate_pairs"],
        "confirmed_pairs": figures["confirmed_pairs"],
        "write_signature_files_seconds": round(write_s, 1),
        "cluster_seconds": round(seconds, 2),
        "cluster_us_per_sample": round(1e6 * seconds / n, 2),
        "peak_rss_per_task": rss.by_task(),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", type=int, default=3000)
    ap.add_argument("--scale", default="200000,2000000")
    ap.add_argument(
        "--out", default=str(HERE / "results" / f"dedup-cpu-{os.cpu_count()}c-{time.strftime('%Y%m%d')}.json")
    )
    args = ap.parse_args()
    import ray

    from fengshen_batch.workers.cluster import init_ray

    init_ray(None)
    result = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "settings": Dedup().model_dump()}

    def save():
        Path(args.out).write_text(json.dumps(result, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        result["quality"] = quality(tmp, args.families)
        print(json.dumps(result["quality"], indent=1))
        save()
        texts, _ = planted(args.families)
        result["cost"] = cost(texts, 128)  # the generation cost of a 128-token sample (jobs/synthetic_dedup)
        result["cost"]["cluster_us_per_sample"] = round(
            1e6 * result["quality"]["cluster_seconds"] / len(texts), 1
        )
        print(json.dumps(result["cost"], indent=1))
        save()
        result["scale"] = []
        for n in (int(x) for x in args.scale.split(",") if x):
            result["scale"].append(scale(tmp, n))
            print(json.dumps(result["scale"][-1], indent=1))
            save()
    ray.shutdown()
    print("wrote", args.out)


if __name__ == "__main__":
    main()
