"""Scoring statements that open alike, such as a judge question's candidates: their shared opening once, each
statement's own tokens after it.

The scores are lm-evaluation-harness `loglikelihood_rolling` NLLs, as `scoring.score_tokens` computes them, for
statements of at most one window (the context): the first token is conditioned on <|endoftext|>. A group's
<|endoftext|> + shared tokens are prefilled once into the first statement's KV blocks, with logits at every
position (they score the shared tokens and each statement's first own token); those blocks are copied to each
other statement's, and each statement's remaining tokens are prefilled after it. On CPU that is faster than the dense
pass from about 8 shared tokens on (1.1x at 8, 1.7x at 16, 2.5x at 32 for 4 answers of 4 tokens:
benchmarks/README.md), so `judging.judge` sends a row here when its statements share at least `MIN_SHARED`
tokens. The two paths agree to float rounding (about 1e-8 relative), not bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..engine.kv_cache import BLOCK, KVCache
from ..engine.model_runner import EAGER_SPAN_BUCKET, bucketed_span, pack_chunks
from ..model.load import Replica
from .batching import run_packed
from .scoring import LOGIT_CHUNK_ROWS

MIN_SHARED = 8  # shared tokens from which the cached path beats the dense one (measured on CPU)


def shared_prefix(token_lists: Sequence[list[int]]) -> int:
    """Tokens all lists open with, leaving each at least one of its own (its first is scored from them)."""
    first, n = token_lists[0], min(len(t) for t in token_lists) - 1
    for t in token_lists[1:]:
        n = next((i for i in range(n) if t[i] != first[i]), n)
    return max(n, 0)


def score_shared(
    replica: Replica, groups: Sequence[Sequence[list[int]]], token_budget: int
) -> tuple[list[list[float]], int]:
    """The NLL sum (float64) of each token list of each group (each list non-empty, at most the context, the
    group's lists sharing `shared_prefix` tokens); and the token budget that fit. Groups are packed so that
    the tokens computed per batch stay within the budget (at most LOGIT_CHUNK_ROWS: every position's logits
    are kept), halved on out-of-memory."""
    cuts = [shared_prefix(g) for g in groups]
    costs = [c + 1 + sum(len(t) - c - 1 for t in g) for c, g in zip(cuts, groups, strict=True)]
    return run_packed(
        costs,
        min(token_budget, LOGIT_CHUNK_ROWS),
        lambda idx: _score_batch(replica, [groups[i] for i in idx], [cuts[i] for i in idx]),
    )


@torch.inference_mode()
def _score_batch(replica: Replica, groups: list[Sequence[list[int]]], cuts: list[int]) -> list[list[float]]:
    model, device = replica.model, replica.device
    longest = max(len(t) for g in groups for t in g)  # positions: <|endoftext|> + all but the last token
    context = bucketed_span(longest, EAGER_SPAN_BUCKET, model.max_len)  # the batch's KV cache length
    firsts = [0]  # each group's first list: its shared part is prefilled there, then copied to the others
    for g in groups[:-1]:
        firsts.append(firsts[-1] + len(g))
    lists = firsts[-1] + len(groups[-1])
    per = -(-context // BLOCK)  # each list's own run of blocks, after the null block

    def table(j: int) -> list[int]:
        return list(range(1 + j * per, 1 + (j + 1) * per))

    cache = KVCache(model.n_layer, 1 + lists * per, model.n_head, model.head_dim, model.dtype, device)
    # (group, list) -> the log-probs of its tokens; list -1 holds the group's shared tokens
    logprobs: dict[tuple[int, int], list[float]] = {}

    def run(chunks, wanted):
        """Prefill (list, tokens, start) chunks; then, for each (chunk, offset, token, key) wanted, the token's
        log-prob at that position of that chunk, added to logprobs[key]."""
        chunks = [(table(j), tokens, start) for j, tokens, start in chunks]
        packed, attn_groups, offsets = pack_chunks(chunks, context, device)  # logits at every token
        lp = model.prefill(cache, *packed[:5], attn_groups, packed[5]).log_softmax(-1)  # (N, V)
        rows = torch.tensor([offsets[b] + i for b, i, _, _ in wanted], device=device)
        cols = torch.tensor([tok for _, _, tok, _ in wanted], device=device)
        for (_, _, _, key), v in zip(wanted, lp[rows, cols].double().tolist(), strict=True):
            logprobs.setdefault(key, []).append(v)

    # <|endoftext|> + the shared tokens: position i predicts shared token i, the last one each list's first own.
    heads, wanted = [], []
    for q, (first, g, c) in enumerate(zip(firsts, groups, cuts, strict=True)):
        heads.append((first, [replica.eos_id, *g[0][:c]], 0))
        wanted += [(q, i, g[0][i], (q, -1)) for i in range(c)]
        wanted += [(q, c, t[c], (q, j)) for j, t in enumerate(g)]
    run(heads, wanted)
    shared = []  # (from block, to block): the blocks of each group's positions 0..c, to its other lists
    for first, g, c in zip(firsts, groups, cuts, strict=True):
        n = -(-(c + 1) // BLOCK)
        shared += [
            (b, d)
            for j in range(first + 1, first + len(g))
            for b, d in zip(table(first)[:n], table(j)[:n], strict=True)
        ]
    cache.copy_blocks([b for b, _ in shared], [d for _, d in shared])
    # Each list's later tokens, after its first own one: at positions c + 1 on, predicting the next.
    tails, wanted = [], []
    for q, (first, g, c) in enumerate(zip(firsts, groups, cuts, strict=True)):
        for j, t in enumerate(g):
            if len(t) > c + 1:
                wanted += [(len(tails), i, t[c + 1 + i], (q, j)) for i in range(len(t) - c - 1)]
                tails.append((first + j, t[c:-1], c + 1))
    if tails:
        run(tails, wanted)
    return [
        [-(sum(logprobs.get((q, -1), [])) + sum(logprobs[(q, j)])) for j in range(len(g))]
        for q, g in enumerate(groups)
    ]
