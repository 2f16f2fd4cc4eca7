"""Generation for a batch of rows: prompts and per-row limits in, samples (or row errors) out.

This is the engine's front door. It tokenizes, applies the too-long policy and each row's output limit,
turns every good row into one engine request (n samples sharing one prefill), and cuts each finished sample
at EOS or its first stop string. The engine (`engine/`) does the scheduling and the model work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..engine.llm_engine import EngineThread, LLMEngine
from ..engine.sampler import sample_key
from ..engine.sequence import Request
from ..model.load import Replica
from ..params import EngineParams, GenerateParams
from .rows import RowError, Sample, check_text


@dataclass
class PromptUsage:
    """Prompt tokens of the requests a caller ran, and how many of them the prefix cache supplied: one
    prefill per prompt (its n samples copy it), so `prompt_tokens - cached_tokens` were computed."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    # prompts cut from the left to fit their max_new_tokens in the context, and the tokens cut off them
    truncated_prompts: int = 0
    truncated_tokens: int = 0

    def add(self, requests: Sequence[Request], truncated: Sequence[int] = ()) -> None:
        self.prompt_tokens += sum(len(r.prompt) for r in requests)
        self.cached_tokens += sum(r.cached for r in requests)
        self.truncated_prompts += len(truncated)
        self.truncated_tokens += sum(truncated)


def _contains_stop(text: str, stop: Sequence[str]) -> bool:
    return any(s in text for s in stop)


def finish_sample(
    replica: Replica, tokens: list[int], nll: list[float], prompt_len: int, index: int, params: GenerateParams
) -> Sample:
    """Cut at EOS or the first stop string, and count tokens and NLL up to that point."""
    ended_by_eos = bool(tokens) and tokens[-1] == replica.eos_id and not params.ignore_eos
    body = tokens[:-1] if ended_by_eos else tokens
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
        n, reason = len(tokens), "stop" if ended_by_eos else "length"
    return Sample(index, text, prompt_len, n, reason, float(sum(nll[:n])), tokens[:n], [-x for x in nll[:n]])


def finish_constrained(replica: Replica, seq, prompt_len: int) -> Sample:
    """A constrained sample ends where its constraint did (no stop strings): `finish_reason` is "stop" when
    the constraint was complete, "length" when the token limit cut it, and `constraint_satisfied` says
    whether the text is valid (never true for an incomplete record)."""
    from ..constraints import satisfied

    tokens, nll = seq.tokens, seq.nll
    body = tokens[:-1] if tokens and tokens[-1] == replica.eos_id else tokens
    text = replica.tokenizer.decode(body)
    ok = satisfied(seq.request.constraint, text, bool(seq.accepting))
    reason = "stop" if seq.complete else "length"
    return Sample(
        seq.index, text, prompt_len, len(tokens), reason, float(sum(nll)), tokens, [-x for x in nll], ok
    )


def row_limit(value: object, default: int, context: int) -> int | RowError:
    """A row's max_new_tokens from its column value: null (or NaN, pandas' null in a float column) means
    the job's; anything else must be a whole number from 1 to context - 1 (a prompt needs a token)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole:
        return RowError("bad_max_new_tokens", f"max_new_tokens {value!r} is not a whole number")
    limit = int(value)
    if not 1 <= limit < context:
        return RowError(
            "bad_max_new_tokens",
            f"max_new_tokens {limit} is outside 1..{context - 1} (the context is {context} tokens, "
            "and a prompt needs at least one)",
        )
    return limit


def prepare_prompt(tokens: list[int] | RowError, limit: int, context: int, params: GenerateParams):
    """Apply the too-long policy to a tokenized prompt: keep its end, or a row error."""
    if isinstance(tokens, RowError):
        return tokens
    if not tokens:
        return RowError("empty_text", "prompt has no tokens")
    room = context - limit
    if len(tokens) > room:
        if params.prompt_too_long == "error":
            return RowError(
                "prompt_too_long",
                f"prompt has {len(tokens)} tokens; at most {room} fit with max_new_tokens={limit} in a "
                f"context of {context}",
            )
        tokens = tokens[-room:]
    return tokens


def generate(
    replica: Replica,
    prompts: Sequence[object],
    row_ids: Sequence[str],
    params: GenerateParams,
    max_new_tokens: Sequence[object] | None = None,
    engine: LLMEngine | EngineThread | None = None,
    usage: PromptUsage | None = None,
    constraints: Sequence[object] | None = None,
) -> list[list[Sample] | RowError]:
    """`num_return_sequences` samples per prompt (or the row's error), in input order. A prompt may be a
    RowError already (a template that could not be filled): it passes through."""
    token_lists = [p if isinstance(p, RowError) else check_text(p) or replica.encode(p) for p in prompts]
    return generate_tokens(replica, token_lists, row_ids, params, max_new_tokens, engine, usage, constraints)


def generate_tokens(
    replica: Replica,
    prompts: Sequence[list[int] | RowError],
    row_ids: Sequence[str],
    params: GenerateParams,
    max_new_tokens: Sequence[object] | None = None,
    engine: LLMEngine | EngineThread | None = None,
    usage: PromptUsage | None = None,
    constraints: Sequence[object] | None = None,
) -> list[list[Sample] | RowError]:
    """`generate` from token ids (row errors pass through). `max_new_tokens`: per-row limits (None entries
    take the job's); `engine`: a replica's long-lived engine, else one is built for this call; `usage`:
    where the prompt tokens run (and those the prefix cache supplied) are added up; `constraints`: per-row
    constraints (None entries take the job's `params.constraint`; a RowError is that row's)."""
    context = replica.max_length
    if params.max_new_tokens >= context:
        raise ValueError(
            f"max_new_tokens={params.max_new_tokens} must be below the model's context of {context}"
        )
    if len(prompts) != len(row_ids) or any(
        v is not None and len(v) != len(prompts) for v in (max_new_tokens, constraints)
    ):
        raise ValueError(
            "one row id (and one max_new_tokens value and constraint, when given) per prompt is required"
        )
    if engine is None:
        engine = LLMEngine(replica, params, EngineParams(max_num_seqs=_slots_for(prompts, params)))
    elif _engine_of(engine).params != params:
        raise ValueError("the engine was built for other generation parameters")
    per_request = _engine_of(engine).max_num_seqs  # a prompt's samples beyond it go in further requests
    n = params.num_return_sequences
    results: list[list[Sample] | RowError] = []
    requests, truncated = [], []  # truncated: tokens cut off each prompt that was cut
    for i, prompt in enumerate(prompts):
        value = None if max_new_tokens is None else max_new_tokens[i]
        limit = row_limit(value, params.max_new_tokens, context)
        prepared = limit if isinstance(limit, RowError) else prepare_prompt(prompt, limit, context, params)
        constraint = params.constraint if constraints is None or constraints[i] is None else constraints[i]
        if not isinstance(prepared, RowError) and constraint is not None:
            prepared = _constraint_error(_engine_of(engine), constraint) or prepared
        if isinstance(prepared, RowError):
            results.append(prepared)
            continue
        if len(prepared) < len(prompt):
            truncated.append(len(prompt) - len(prepared))
        keys = [sample_key(params.seed, str(row_ids[i]), s) for s in range(n)]
        for first in range(0, n, per_request):
            requests.append(
                Request(i, prepared, keys[first : first + per_request], limit, first, constraint=constraint)
            )
        results.append([])
    if requests:
        engine.run(requests)
        if usage is not None:
            usage.add(requests, truncated)
    for req in requests:
        results[req.ident] += [
            replace(
                finish_constrained(replica, s, len(req.prompt))
                if req.constraint is not None
                else finish_sample(replica, s.tokens, s.nll, len(req.prompt), s.index, params),
                cached_prompt_tokens=req.cached,
            )
            for s in req.seqs
        ]
    return results


def _constraint_error(engine: LLMEngine, constraint) -> RowError | None:
    """The row's error if its constraint is one already or does not compile for this tokenizer."""
    if isinstance(constraint, RowError):
        return constraint
    error = engine.constraint_error(constraint)
    return RowError("bad_constraint", error[:2000]) if error else None


def _engine_of(engine: LLMEngine | EngineThread) -> LLMEngine:
    return engine.engine if isinstance(engine, EngineThread) else engine


def _slots_for(prompts: Sequence[object], params: GenerateParams) -> int:
    """A one-off engine needs no more slots than the call has samples."""
    return max(1, min(256, len(prompts) * params.num_return_sequences))


def keep_best(samples: list[Sample], k: int) -> list[Sample]:
    """The k samples with the lowest NLL per token (ties: the lower sample index), in sample-index order:
    best-of-n's rejection step. Each keeps its original sample_index."""
    best = sorted(samples, key=lambda s: (s.nll_per_token, s.sample_index))[:k]
    return sorted(best, key=lambda s: s.sample_index)
