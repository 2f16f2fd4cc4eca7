"""Mergeable summaries of generated samples: the generate job's report without a pass over its output.

As for scoring (`score_sketch.py`), the actor that writes a shard summarises its samples (`summarize`), the summary
rides in the shard's marker, and the driver merges them (`merge`), O(shards x bins) in memory. A summary holds:
- exact counts: samples, prompts, samples and generated tokens per finish_reason, repetition loops, prompts
  whose samples are all the same text (all of a prompt's samples are in one shard, so this is exact);
- integer histograms (one bin per whole number: exact quantiles) of generated tokens per finish_reason and of
  prompt tokens per prompt; a linear histogram of NLL per generated token, bins of 0.001 nats;
- NLL as a whole number of 2^-32 nats per sample, so sums are exact and merge in any order;
- distinct counts (`distinct.py`: exact up to 1,024, then HyperLogLog, 0.81% standard error) of sample texts
  (the duplicates), and of word unigrams and bigrams (distinct-1 and distinct-2);
- example samples: the lowest and highest NLL per token, the longest loops, and a random handful chosen by
  the smallest hashes of (id, sample_index): the same samples on every rebuild, whatever the sharding.
The same figures per value of the report's `by` column (nulls their own group; at most histograms.MAX_GROUPS values); examples overall only.

Words: each CJK ideograph or kana is a word of its own (Chinese has no spaces), any other run of letters or
digits is one word, and each punctuation mark is one. A text's duplicate key is its NFKC form, casefolded,
with whitespace runs made one space and the ends stripped.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from ..io.outputs import sum_counts
from . import distinct
from .histograms import MAX_GROUPS, group_keys, histogram, merge_groups, merge_histograms, quantiles

EXAMPLES = 10  # samples shown in each example table
KIND = "generate"
# The result columns a summary reads (by their own names), and the one that marks a generate job's output.
RESULTS = [
    "sample_index",
    "generation",
    "prompt_tokens",
    "generated_tokens",
    "finish_reason",
    "generation_nll_sum",
    # where the job wrote them (a constraint, few-shot prompts): read when present
    "constraint_satisfied",
    "few_shot_ids",
    "cached_prompt_tokens",
]
MARKER = "generation"
PROMPT_CHARS, TEXT_CHARS = 300, 600  # of each example's prompt and generation
NLL_WIDTH = 0.001  # nats per token: the bins of the NLL-per-token histogram
NLL_UNIT = 2.0**-32  # nats: the fixed point of exact NLL sums
LOOP_PERIODS = 32  # the longest repeated block, in words, that counts as a loop
LOOP_REPEATS, LOOP_MIN_WORDS = 4, 16  # a loop: a block repeated back to back 4+ times, over 16+ words
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")


def normalize(text: str) -> str:
    """A text's duplicate key: NFKC, casefolded, whitespace runs made one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def loop_words(ids: np.ndarray, sample_of: np.ndarray, samples: int) -> np.ndarray:
    """Per sample, the words covered by its longest loop (0 where it has none): for each period p, the
    longest run of words each equal to the one p before it; p + run words repeat a p-word block
    (p + run) / p times, a loop where that is LOOP_REPEATS or more over LOOP_MIN_WORDS or more words.
    ids, sample_of: [words of the shard] word ids and the sample each word is in (samples contiguous)."""
    best = np.zeros(samples, dtype=np.int64)
    for p in range(1, LOOP_PERIODS + 1):
        if len(ids) <= p:
            break
        same = (ids[p:] == ids[:-p]) & (sample_of[p:] == sample_of[:-p])  # [words - p]
        if not same.any():
            continue
        run_id = np.cumsum(~same)  # each run of True shares the id of the False before it
        lengths = np.bincount(run_id[same])  # [runs] its length, by run id
        starts = np.flatnonzero(np.diff(np.concatenate([[0], same.astype(np.int8)])) == 1)  # a run's start
        run_len = lengths[run_id[starts]]
        covered = run_len + p
        ok = (covered >= LOOP_REPEATS * p) & (covered >= LOOP_MIN_WORDS)
        np.maximum.at(best, sample_of[p:][starts[ok]], covered[ok])
    return best


def _examples(rows: list[dict], key: Callable[[dict], float]) -> list[dict]:
    """The EXAMPLES first rows by `key` (ties by id and sample), each once."""
    unique = {(str(r["id"]), r["sample_index"]): r for r in rows}
    return sorted(unique.values(), key=lambda r: (key(r), str(r["id"]), r["sample_index"]))[:EXAMPLES]


def _group_figures(s: dict, mask: np.ndarray) -> dict:
    """The counts, histograms and sketches of the samples in `mask` (all of a prompt's samples or none)."""
    reasons = s["finish_reason"][mask]
    tokens = s["generated_tokens"][mask]
    scored = mask & (s["generated_tokens"] > 0)
    words = mask[s["sample_of"]]  # [words]
    pairs = words[:-1] & s["pair"]  # [words - 1] a bigram within one sample of the group
    prompt = mask & s["first"]
    out = {
        "samples": int(mask.sum()),
        "prompts": int(prompt.sum()),
        "finish": {
            str(r): {
                "samples": int((reasons == r).sum()),
                "tokens": int(tokens[reasons == r].sum()),
                "generated_tokens": histogram(tokens[reasons == r], integer=True),
            }
            for r in np.unique(reasons)
        },  # fmt: skip
        "nll_units": int(s["nll_units"][scored].sum()),
        "nll_tokens": int(s["generated_tokens"][scored].sum()),
        "nll_per_token": histogram(s["nll_per_token"][scored], NLL_WIDTH),
        "prompt_tokens": histogram(s["prompt_tokens"][prompt], integer=True),
        "texts": distinct.sketch(s["text_hash"][mask]),
        "multi_sample_prompts": int((prompt & (s["prompt_size"] > 1)).sum()),
        "collapsed_prompts": int((prompt & s["collapsed"]).sum()),
        "words": int(words.sum()),
        "bigrams": int(pairs.sum()),
        "distinct_words": distinct.sketch(s["word_hash"][words]),
        "distinct_bigrams": distinct.sketch(s["bigram_hash"][pairs]),
        "loops": int((s["loop"][mask] > 0).sum()),
    }
    if "header_hash" in s:  # few-shot prompts: distinct headers, examples used, the cache's share, per prompt
        first = prompt  # a prompt's samples share its header and its prefill
        out["few_shot_headers"] = distinct.sketch(s["header_hash"][first])
        out["few_shot_examples"] = distinct.sketch(s["example_hash"][mask[s["example_of"]]])
        out["few_shot_prompt_tokens"] = int(s["prompt_tokens"][first].sum())
        out["few_shot_cached_tokens"] = int(s["cached"][first].sum())
    if s["constrained"][mask].any():  # constrained samples: valid, cut by their limit, or failed otherwise
        invalid = mask & s["constrained"] & ~s["satisfied"]
        out["constrained"] = int((mask & s["constrained"]).sum())
        out["constraint_satisfied"] = int((mask & s["satisfied"]).sum())
        out["constraint_cut"] = int((invalid & (s["finish_reason"] == "length")).sum())
        out["constraint_failed"] = int((invalid & (s["finish_reason"] != "length")).sum())
    return out


def _merge_figures(parts: list[dict]) -> dict:
    reasons = sorted({r for p in parts for r in p["finish"]})
    out = sum_counts([{k: v for k, v in p.items() if isinstance(v, int)} for p in parts])
    out["finish"] = {
        r: {"samples": sum(p["finish"][r]["samples"] for p in parts if r in p["finish"]),
            "tokens": sum(p["finish"][r]["tokens"] for p in parts if r in p["finish"]),
            "generated_tokens": merge_histograms([p["finish"][r]["generated_tokens"] for p in parts
                                                  if r in p["finish"]])}
        for r in reasons
    }  # fmt: skip
    for key in ("nll_per_token", "prompt_tokens"):
        out[key] = merge_histograms([p[key] for p in parts])
    for key in ("texts", "distinct_words", "distinct_bigrams", "few_shot_headers", "few_shot_examples"):
        if any(key in p for p in parts):
            out[key] = distinct.merge([p[key] for p in parts if key in p])
    return out


def summarize(data: pa.Table, prompt_column: str | None, by: str | None, id_column: str = "id") -> dict:
    """The summary of one shard's (or file's) samples, in row order (a prompt's samples next to each other).
    `prompt_column`: the prompts' text, for the examples (None: not in the output)."""
    n = data.num_rows
    texts = [t or "" for t in data.column("generation").to_pylist()]
    ids = data.column(id_column).to_pylist()
    s = {
        "finish_reason": np.asarray(data.column("finish_reason").to_pylist(), dtype=object).astype(str),
        "generated_tokens": data.column("generated_tokens").to_numpy().astype(np.int64),
        "prompt_tokens": data.column("prompt_tokens").to_numpy().astype(np.int64),
    }
    satisfied = (
        data.column("constraint_satisfied").to_pylist()
        if "constraint_satisfied" in data.column_names
        else [None] * n
    )
    s["constrained"] = np.array([v is not None for v in satisfied], dtype=bool)
    s["satisfied"] = np.array([v is True for v in satisfied], dtype=bool)
    if "few_shot_ids" in data.column_names:  # the header each prompt held (its examples' ids, in order)
        shots = data.column("few_shot_ids").to_pylist()
        s["header_hash"] = distinct.stable_hashes("\x1f".join(x or ()) for x in shots)
        s["example_hash"] = distinct.stable_hashes(e for x in shots for e in x or ())
        s["example_of"] = np.repeat(np.arange(n), [len(x or ()) for x in shots])
        s["cached"] = np.asarray(
            [c or 0 for c in data.column("cached_prompt_tokens").to_pylist()], dtype=np.int64
        )
    nll = data.column("generation_nll_sum").to_numpy().astype(np.float64)
    s["nll_units"] = np.round(nll / NLL_UNIT).astype(np.int64)
    s["nll_per_token"] = nll / np.maximum(s["generated_tokens"], 1)
    # prompts: runs of one id; a prompt's samples are collapsed when they are all one text
    first = np.ones(n, dtype=bool)
    first[1:] = np.array([a != b for a, b in zip(ids[1:], ids[:-1], strict=True)], dtype=bool)
    starts = np.flatnonzero(first)
    prompt_of = np.cumsum(first) - 1
    s["first"] = first
    s["prompt_size"] = np.zeros(n, dtype=np.int64)
    s["prompt_size"][starts] = np.diff(np.append(starts, n))
    s["text_hash"] = distinct.stable_hashes(normalize(t) for t in texts)
    varied = np.zeros(len(starts), dtype=bool)  # a prompt with two different texts among its samples
    if n:  # a sample unlike the one before it, in the same prompt
        varied[prompt_of[1:][(s["text_hash"][1:] != s["text_hash"][:-1]) & ~first[1:]]] = True
    s["collapsed"] = first & (s["prompt_size"] > 1) & ~varied[prompt_of]
    # words: ids within the shard, hashed once per distinct word
    vocab: dict[str, int] = {}
    words = [[vocab.setdefault(w, len(vocab)) for w in WORD.findall(t)] for t in texts]
    lengths = np.array([len(w) for w in words], dtype=np.int64)
    word_ids = np.fromiter((i for w in words for i in w), dtype=np.int64, count=int(lengths.sum()))
    s["sample_of"] = np.repeat(np.arange(n), lengths)
    s["word_hash"] = distinct.stable_hashes(vocab)[word_ids]
    s["pair"] = s["sample_of"][1:] == s["sample_of"][:-1]  # [words - 1]
    s["bigram_hash"] = distinct.mix(s["word_hash"][:-1], s["word_hash"][1:])
    s["loop"] = loop_words(word_ids, s["sample_of"], n)

    summary = _group_figures(s, np.ones(n, dtype=bool))
    summary["examples"] = _shard_examples(data, s, texts, ids, prompt_column)
    if by:
        summary["by"], summary["groups"] = by, {}
        for g, mask in _group_masks(data.column(by)):
            if mask is None:
                summary["groups_left_out"] = g
                break
            summary["groups"][g] = _group_figures(s, mask)
    return summary


def _group_masks(column: pa.ChunkedArray):
    """(group, its rows' mask) per value of a `by` column; for a list column (few_shot_ids: which outputs
    did example X shape?) per element, a row in the group of each element it holds, so those groups add up
    to more than the total. Past MAX_GROUPS values: one (count, None)."""
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lists = [{str(v) for v in x or ()} for x in column.to_pylist()]
        values = sorted(set().union(*lists)) if lists else []
        if len(values) > MAX_GROUPS:
            yield len(values), None
            return
        for g in values:
            yield g, np.fromiter((g in x for x in lists), dtype=bool, count=len(lists))
        return
    keys_by, n_values = group_keys(column)
    if keys_by is None:
        yield n_values, None
        return
    keys = np.asarray(keys_by, dtype=object)
    for g in sorted(set(keys_by)):
        yield g, keys == g


def _fewest(values: np.ndarray, among: np.ndarray) -> np.ndarray:
    """The indices in `among` holding the EXAMPLES smallest `values`, ties at the cut included (so the
    tie-breaking by id stays `_examples`' to do)."""
    if len(among) <= EXAMPLES:
        return among
    cut = np.partition(values[among], EXAMPLES - 1)[EXAMPLES - 1]
    return among[values[among] <= cut]


def _shard_examples(data: pa.Table, s: dict, texts: list[str], ids: list, prompt_column: str | None) -> dict:
    """The shard's example tables; rows are built only for the samples that can be picked."""
    n = data.num_rows
    scored = np.flatnonzero(s["generated_tokens"] > 0)
    looped = np.flatnonzero(s["loop"] > 0)
    sample_index = data.column("sample_index").to_pylist()
    keys = distinct.stable_hashes(f"{ids[i]}\x1f{sample_index[i]}" for i in range(n))
    nll = s["nll_per_token"]
    chosen = {i: None for part in (_fewest(nll, scored), _fewest(-nll, scored), _fewest(-s["loop"], looped),
                                   _fewest(keys, np.arange(n))) for i in part.tolist()}  # fmt: skip
    prompts = data.column(prompt_column) if prompt_column else None
    for i in chosen:
        chosen[i] = {
            "id": ids[i], "sample_index": sample_index[i],
            "prompt": ((prompts[i].as_py() if prompts is not None else None) or "")[:PROMPT_CHARS],
            "generation": texts[i][:TEXT_CHARS],
            "nll_per_token": float(nll[i]) if s["generated_tokens"][i] else None,
            "generated_tokens": int(s["generated_tokens"][i]), "finish_reason": s["finish_reason"][i],
            "loop_words": int(s["loop"][i]), "key": int(keys[i]),
        }  # fmt: skip
    rows = list(chosen.values())
    return _pick(
        [[r for r in rows if r["generated_tokens"] > 0]], [[r for r in rows if r["loop_words"]]], [rows]
    )


def _pick(scored: list[list[dict]], loops: list[list[dict]], every: list[list[dict]]) -> dict:
    """The example tables from lists of candidate rows (a shard's, or the shards' examples)."""
    scored_rows = [r for part in scored for r in part]
    return {
        "lowest_nll": _examples(scored_rows, lambda r: r["nll_per_token"]),
        "highest_nll": _examples(scored_rows, lambda r: -r["nll_per_token"]),
        "longest_loops": _examples([r for part in loops for r in part], lambda r: -r["loop_words"]),
        "random": _examples([r for part in every for r in part], lambda r: r["key"]),
    }


def merge(summaries: list[dict]) -> dict:
    """One summary of many (shards'), equal whatever their order or grouping."""
    merged = _merge_figures(summaries)
    ex = [s["examples"] for s in summaries]
    merged["examples"] = _pick(
        [e["lowest_nll"] + e["highest_nll"] for e in ex],
        [e["longest_loops"] for e in ex],
        [e["random"] for e in ex],
    )
    merged.update(merge_groups(summaries, _merge_figures))
    return merged


def few_shot_figures(summary: dict) -> dict:
    """{"few_shot": ...} of few-shot prompts ({} for other jobs): distinct headers and examples used
    (estimates past 1,024, as the other distinct counts), and the share of their prompt tokens the prefix
    cache supplied."""
    if "few_shot_headers" not in summary:
        return {}
    tokens = summary["few_shot_prompt_tokens"]
    return {
        "few_shot": {
            "distinct_headers": round(distinct.count(summary["few_shot_headers"])),
            "examples_used": round(distinct.count(summary["few_shot_examples"])),
            "prefix_cache_hit_rate": summary["few_shot_cached_tokens"] / tokens if tokens else None,
        }
    }


def constraint_figures(summary: dict) -> dict:
    """{"constraint": counts} of constrained samples ({} where none was)."""
    if not summary.get("constrained"):
        return {}
    keys = ("constraint_satisfied", "constraint_cut", "constraint_failed")
    counts = {k.removeprefix("constraint_"): summary.get(k, 0) for k in keys}
    return {"constraint": {"samples": summary["constrained"], **counts}}


def figures(summary: dict) -> dict:
    """What summary.json shows of a (merged) summary's figures."""
    samples = summary["samples"]
    finish = summary["finish"]
    lengths = merge_histograms([f["generated_tokens"] for f in finish.values()]) if finish else histogram([])
    texts = distinct.count(summary["texts"])
    return {
        "samples": samples,
        "prompts": summary["prompts"],
        "finish_reasons": {r: f["samples"] for r, f in finish.items()},
        "generated_tokens": {
            "sum": sum(f["tokens"] for f in finish.values()),
            "quantiles": quantiles(lengths),
            "by_finish_reason": {
                r: {
                    "samples": f["samples"],
                    "sum": f["tokens"],
                    "quantiles": quantiles(f["generated_tokens"]),
                }
                for r, f in finish.items()
            },
        },  # fmt: skip
        "limit_hit_fraction": finish.get("length", {}).get("samples", 0) / samples if samples else None,
        "nll_per_token": {
            # the token-weighted mean (NLL of all generated tokens / their count), exact
            "mean": summary["nll_units"] * NLL_UNIT / summary["nll_tokens"]
            if summary["nll_tokens"]
            else None,
            "quantiles": quantiles(summary["nll_per_token"]),
        },
        "prompt_tokens": {"quantiles": quantiles(summary["prompt_tokens"])},
        "duplicate_samples": max(0, samples - round(texts)),
        "collapsed_prompts": summary["collapsed_prompts"] if summary["multi_sample_prompts"] else None,
        "distinct_1": distinct.count(summary["distinct_words"]) / summary["words"]
        if summary["words"]
        else None,
        "distinct_2": (
            distinct.count(summary["distinct_bigrams"]) / summary["bigrams"] if summary["bigrams"] else None
        ),
        "repetition_loops": summary["loops"],
        **constraint_figures(summary),
        **few_shot_figures(summary),
        "exact": {  # False: a HyperLogLog estimate (standard error 0.81% of the distinct count)
            "duplicate_samples": distinct.is_exact(summary["texts"]),
            "distinct_1": distinct.is_exact(summary["distinct_words"]),
            "distinct_2": distinct.is_exact(summary["distinct_bigrams"]),
        },
    }
