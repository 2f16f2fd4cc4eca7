"""Batched generation: left-padded prompts, a static KV cache, reproducible per-sample randomness.

Each (prompt, sample_index) pair is one row of the decode batch. Shapes stay fixed through the loop: the
cache is allocated once for (rows, prompt width + max_new_tokens), the attention mask has that full width
from the start, and every step feeds one token per row. The host only looks at the device every
`sync_every` steps, to stop early once every row has ended (EOS or a stop string).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import StaticCache

from .batching import run_packed
from .loading import Replica
from .params import GenerateParams
from .results import RowError, Sample, check_text
from .sampling import choose, process_logits, sample_key


@dataclass(frozen=True)
class _Row:
    prompt: list[int]  # token ids after left truncation
    key: int  # sampling key of (seed, row id, sample index)


@dataclass(frozen=True)
class _Decoded:
    tokens: list[int]  # generated ids, EOS included if produced
    nll: list[float]  # -log p of each, at temperature 1, unwarped


def _contains_stop(text: str, stop: Sequence[str]) -> bool:
    return any(s in text for s in stop)


@torch.inference_mode()
def decode_batch(
    replica: Replica, rows: Sequence[_Row], params: GenerateParams, sync_every: int = 8
) -> list[_Decoded]:
    """Run the decode loop for one batch of rows; return each row's raw generated tokens and their NLLs."""
    model, device, eos = replica.model, replica.device, replica.eos_id
    B = len(rows)
    P = max(len(r.prompt) for r in rows)  # prompt width
    N = params.max_new_tokens
    V = model.config.vocab_size

    input_ids = torch.full((B, P), eos, dtype=torch.long)
    mask = torch.zeros((B, P + N), dtype=torch.long)  # 1 = real token; generated positions are all real
    for b, r in enumerate(rows):
        input_ids[b, P - len(r.prompt) :] = torch.tensor(r.prompt)
        mask[b, P - len(r.prompt) :] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    prompt_lens = torch.tensor([len(r.prompt) for r in rows], device=device)  # (B,)
    keys = torch.tensor([r.key for r in rows], dtype=torch.long, device=device)  # (B,)
    positions = (mask[:, :P].cumsum(-1) - 1).clamp(min=0)  # (B, P): left padding does not shift positions

    # Repetition penalty applies to prompt tokens and generated ones, never to the padding.
    seen = torch.zeros((B, V), dtype=torch.bool, device=device)
    seen.scatter_(1, input_ids, mask[:, :P].bool())

    cache = StaticCache(config=model.config, max_cache_len=P + N)  # fixed shapes for the whole loop
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    tokens = torch.full((B, N), eos, dtype=torch.long, device=device)  # (B, N)
    nll = torch.zeros((B, N), dtype=torch.float32, device=device)  # (B, N)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    steps = 0
    for t in range(N):
        logits = out.logits[:, -1].float()  # (B, V)
        next_tok = choose(process_logits(logits, seen, params), keys, t, params)
        next_tok = torch.where(done, eos, next_tok)
        tokens[:, t] = next_tok
        step_nll = -logits.log_softmax(-1).gather(1, next_tok[:, None]).squeeze(1)
        nll[:, t] = torch.where(done, 0.0, step_nll)
        if not params.ignore_eos:
            done |= next_tok == eos
        seen.scatter_(1, next_tok[:, None], True)
        steps = t + 1
        if steps == N:
            break
        if steps % sync_every == 0:
            if params.stop:
                done |= _stop_seen(replica, tokens[:, :steps], params.stop, device)
            if bool(done.all()):
                break
        out = model(
            input_ids=next_tok[:, None],
            attention_mask=mask,
            position_ids=(prompt_lens + t)[:, None],
            past_key_values=cache,
            use_cache=True,
        )
    tokens_host, nll_host = tokens[:, :steps].tolist(), nll[:, :steps].tolist()
    decoded = []
    for toks, nlls in zip(tokens_host, nll_host, strict=True):
        end = toks.index(eos) + 1 if eos in toks and not params.ignore_eos else len(toks)
        decoded.append(_Decoded(toks[:end], nlls[:end]))
    return decoded


def _stop_seen(replica: Replica, tokens: torch.Tensor, stop: Sequence[str], device) -> torch.Tensor:
    """(B,) bool: rows whose generated text so far contains a stop string (the one host sync per check)."""
    texts = replica.tokenizer.batch_decode(tokens.tolist())
    return torch.tensor([_contains_stop(t, stop) for t in texts], device=device)


def _finish(
    replica: Replica, decoded: _Decoded, prompt_len: int, index: int, params: GenerateParams
) -> Sample:
    """Cut at EOS or the first stop string, and count tokens and NLL up to that point."""
    toks = decoded.tokens
    ended_by_eos = bool(toks) and toks[-1] == replica.eos_id and not params.ignore_eos
    body = toks[:-1] if ended_by_eos else toks
    text = replica.tokenizer.decode(body)
    cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
    if cut >= 0:
        # The fewest tokens whose text already holds a stop string (binary search: holding one is monotone).
        lo, hi = 1, len(body)
        while lo < hi:
            mid = (lo + hi) // 2
            if _contains_stop(replica.tokenizer.decode(body[:mid]), params.stop):
                hi = mid
            else:
                lo = mid + 1
        n, text, reason = lo, text[:cut], "stop"
    else:
        n, reason = len(toks), "stop" if ended_by_eos else "length"
    return Sample(index, text, prompt_len, n, reason, float(sum(decoded.nll[:n])))


def prepare_prompt(
    replica: Replica, tokens: list[int] | RowError, params: GenerateParams
) -> list[int] | RowError:
    """Apply the too-long policy to a tokenized prompt: keep its end, or a row error."""
    if isinstance(tokens, RowError):
        return tokens
    if not tokens:
        return RowError("empty_text", "prompt has no tokens")
    limit = replica.max_length - params.max_new_tokens
    if len(tokens) > limit:
        if params.prompt_too_long == "error":
            return RowError(
                "prompt_too_long",
                f"prompt has {len(tokens)} tokens; at most {limit} fit with max_new_tokens="
                f"{params.max_new_tokens} in a context of {replica.max_length}",
            )
        tokens = tokens[-limit:]
    return tokens


def generate(
    replica: Replica,
    prompts: Sequence[object],
    row_ids: Sequence[str],
    params: GenerateParams,
    token_budget: int = 16384,
) -> tuple[list[list[Sample] | RowError], int]:
    """Generate `num_return_sequences` samples per prompt; return (per-row samples or error, budget that fit)."""
    token_lists = [check_text(p) or replica.encode(p) for p in prompts]
    return generate_tokens(replica, token_lists, row_ids, params, token_budget)


def generate_tokens(
    replica: Replica,
    prompts: Sequence[list[int] | RowError],
    row_ids: Sequence[str],
    params: GenerateParams,
    token_budget: int = 16384,
) -> tuple[list[list[Sample] | RowError], int]:
    """`generate` from token ids (row errors pass through)."""
    if params.max_new_tokens >= replica.max_length:
        raise ValueError(
            f"max_new_tokens={params.max_new_tokens} must be below the model's context of {replica.max_length}"
        )
    if len(prompts) != len(row_ids):
        raise ValueError("one row id per prompt is required")
    prepared = [prepare_prompt(replica, p, params) for p in prompts]
    items: list[tuple[int, int]] = []  # (row, sample index): one decode row each
    rows: list[_Row] = []
    for i, prompt in enumerate(prepared):
        if isinstance(prompt, RowError):
            continue
        for s in range(params.num_return_sequences):
            items.append((i, s))
            rows.append(_Row(prompt, sample_key(params.seed, str(row_ids[i]), s)))

    decoded, budget = run_packed(
        [len(r.prompt) + params.max_new_tokens for r in rows],
        token_budget,
        lambda idx: decode_batch(replica, [rows[j] for j in idx], params),
    )
    results: list[list[Sample] | RowError] = [p if isinstance(p, RowError) else [] for p in prepared]
    for (i, s), row, dec in zip(items, rows, decoded, strict=True):
        results[i].append(_finish(replica, dec, len(row.prompt), s, params))
    return results, budget
