"""Perplexity of texts, with lm-evaluation-harness `loglikelihood_rolling` semantics.

A text is tokenized without special tokens; its first token is conditioned on <|endoftext|>; a text longer
than the context is cut into lm-eval's rolling windows so that every token is scored exactly once. Windows of
all texts are scored together in token-budget batches and summed back per text in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..engine.model_runner import PREFILL_WIDTH_BUCKET, round_up
from ..model.load import Replica
from ..params import ScoreParams
from .batching import run_packed
from .rows import RowError, ScoreResult, check_text

# Rows of hidden states pushed through the LM head at once: 4096 x 50,304 vocab x 4 bytes = 0.8 GB of fp32
# logits, instead of the whole batch's (64k tokens would be 13 GB).
LOGIT_CHUNK_ROWS = 4096


def rolling_windows(
    tokens: Sequence[int], prefix_token: int, max_len: int, stride: int | None = None
) -> list[tuple[list[int], int]]:
    """lm-eval's `get_rolling_token_windows` + `make_disjoint_window`, as (seq, n_scored) pairs.

    `seq[:-1]` is the model input (at most `max_len` tokens) and the last `n_scored` tokens of `seq` are the
    targets predicted from its last `n_scored` positions. The first window predicts the first
    min(max_len, n) tokens from <|endoftext|> + text; each later window predicts the next `stride` tokens
    (default `max_len`, lm-eval's choice) with the full window of preceding tokens as context, the last
    window taking whatever context it needs to fill `max_len`.
    """
    n = len(tokens)
    if n == 0:
        return []
    pred_len = min(stride or max_len, max_len)
    first = min(max_len, n)
    windows = [([prefix_token, *tokens[:first]], first)]
    predicted = first
    while predicted < n:
        scored = min(n - predicted, pred_len)
        end = predicted + scored
        windows.append((list(tokens[end - max_len - 1 : end]), scored))
        predicted = end
    return windows


@torch.inference_mode()
def window_logprobs(
    replica: Replica, windows: Sequence[tuple[list[int], int]], per_token: bool = False
) -> list[float] | list[list[float]]:
    """Sum of target log-probs (float64) for each window of one batch; with `per_token`, each window's
    target log-probs themselves, in order.

    Rows are right-padded and run without an attention mask (see `GPT2.hidden`).
    """
    model, device = replica.model, replica.device
    widths = [len(seq) - 1 for seq, _ in windows]
    # Padded to a multiple of 16 (within the context): CPU attention sums in another order for odd lengths, so
    # a text's bits would depend on the longest text beside it; rounded, they do not.
    B, T = len(windows), min(round_up(max(widths), PREFILL_WIDTH_BUCKET), replica.max_length)
    input_ids = torch.full((B, T), replica.eos_id, dtype=torch.long)
    rows, cols, targets = [], [], []
    for b, ((seq, n_scored), w) in enumerate(zip(windows, widths, strict=True)):
        input_ids[b, :w] = torch.tensor(seq[:-1])
        rows += [b] * n_scored
        cols += range(w - n_scored, w)
        targets += seq[-n_scored:]
    hidden = model.hidden(input_ids.to(device))  # (B, T, d), before ln_f
    # Only scored positions go through ln_f and the LM head, in chunks, in float32.
    h = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]  # (N, d)
    tgt = torch.tensor(targets, device=device)  # (N,)
    logprobs = torch.empty(len(targets), dtype=torch.float64, device=device)
    for start in range(0, len(targets), LOGIT_CHUNK_ROWS):
        sl = slice(start, start + LOGIT_CHUNK_ROWS)
        logits = model.logits(h[sl])  # (chunk, V) float32
        logprobs[sl] = logits.log_softmax(-1).gather(1, tgt[sl, None]).squeeze(1).double()
    if per_token:  # rows were laid out window by window: split them back
        flat = logprobs.tolist()
        out, at = [], 0
        for _, n_scored in windows:
            out.append(flat[at : at + n_scored])
            at += n_scored
        return out
    sums = torch.zeros(B, dtype=torch.float64, device=device)
    sums.index_add_(0, torch.tensor(rows, device=device), logprobs)
    return sums.tolist()


def score_tokens(
    replica: Replica,
    token_lists: Sequence[list[int] | RowError],
    params: ScoreParams | None = None,
    token_budget: int = 16384,
    token_logprobs: bool = False,
) -> tuple[list[tuple[float, int, list[float] | None] | RowError], int]:
    """(nll_sum, token_count, the log-prob of each token or None) of each token list (row errors pass
    through); and the token budget that fit. Each token is scored in exactly one window, so with
    `token_logprobs` the windows' log-probs concatenated are the text's, one per token."""
    params = params or ScoreParams()
    results: list[tuple[float, int] | RowError | None] = [None] * len(token_lists)
    windows: list[tuple[list[int], int]] = []
    owner: list[int] = []  # token-list index of each window
    for i, tokens in enumerate(token_lists):
        if isinstance(tokens, RowError):
            results[i] = tokens
            continue
        if not tokens:
            results[i] = RowError("empty_text", "text has no tokens")
            continue
        for w in rolling_windows(tokens, replica.eos_id, replica.max_length, params.stride):
            windows.append(w)
            owner.append(i)

    per_window, budget = run_packed(
        [len(seq) - 1 for seq, _ in windows],
        token_budget,
        lambda idx: window_logprobs(replica, [windows[j] for j in idx], token_logprobs),
    )
    nll: dict[int, float] = {}
    tokens: dict[int, list[float]] = {}
    for i, logprob in zip(owner, per_window, strict=True):  # a text's windows in order
        if token_logprobs:
            tokens.setdefault(i, []).extend(logprob)
            logprob = math.fsum(logprob)
        nll[i] = nll.get(i, 0.0) - logprob
    for i in nll:
        results[i] = (nll[i], len(token_lists[i]), tokens.get(i))
    return results, budget


def score_texts(
    replica: Replica,
    texts: Sequence[object],
    params: ScoreParams | None = None,
    token_budget: int = 16384,
    token_logprobs: bool = False,
) -> tuple[list[ScoreResult | RowError], int]:
    """Score each text; return (one result or row error per text, in order; the token budget that fit).
    `token_logprobs`: each result also carries its token ids and their log-probs."""
    token_lists = [check_text(t) or replica.encode(t) for t in texts]
    scored, budget = score_tokens(replica, token_lists, params, token_budget, token_logprobs)
    results = [
        r if isinstance(r, RowError)
        else ScoreResult(r[0], r[1], len(text.encode("utf-8")), ids if token_logprobs else None, r[2])
        for text, ids, r in zip(texts, token_lists, scored, strict=True)
    ]  # fmt: skip
    return results, budget
