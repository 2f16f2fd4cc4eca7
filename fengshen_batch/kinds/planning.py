"""What `fengshen-batch plan` counts per kind from a sample of rows, as the job would count them: the kinds'
`plan_tokens` call these (no model: the model's tokenizer only)."""

from __future__ import annotations

from .rows import RowError, check_text, fill_template

BLOCK = 16  # the prefix cache matches whole blocks (engine.kv_cache.BLOCK)


def model_tokenizer(spec) -> tuple[object, dict, int]:
    """The model's tokenizer, config and context from its metadata alone (config and tokenizer files, never
    the weights): what a plan counts with, and what a few-shot job's headers are checked against."""
    import json
    import shutil

    from ..io.storage import storage_options
    from ..model.source import fetch_metadata, is_url
    from ..model.tokenizer import GPT2TextTokenizer

    meta = fetch_metadata(spec.model, storage_options(spec.model, spec.storage))
    try:
        config = json.loads((meta / "config.json").read_text())
        tokenizer = GPT2TextTokenizer.from_dir(meta)
    finally:
        if is_url(spec.model) and not spec.model.startswith("file://"):
            shutil.rmtree(meta, ignore_errors=True)
    return tokenizer, config, config.get("n_positions") or config.get("n_ctx") or 1024


def shared_prefix_tokens(prompts: list[list[int]]) -> int:
    """Prompt tokens an unbounded prefix cache would serve: each prompt's longest common prefix with one
    before it in sorted order, in whole blocks, at most all but its last token."""
    served, previous = 0, None
    for p in sorted(prompts):
        if previous is not None:
            n = 0
            for a, b in zip(p, previous, strict=False):
                if a != b:
                    break
                n += 1
            served += min(n, len(p) - 1) // BLOCK * BLOCK
        previous = p
    return served


def generate_tokens(spec, rows, encode, context: int) -> tuple[dict, list[str]]:
    """A generate job's prompt tokens as it counts them (after its truncation), those cut, the most it can
    generate, and what a prefix cache would serve; a warning when most prompts would be cut."""
    from .generation import prepare_prompt, row_limit

    params, prompts, limits, cut_rows, cut_tokens, errors = spec.params(), [], [], 0, 0, 0
    for row in rows:
        if spec.prompt_template:
            text = fill_template(spec.prompt_template, spec.template_columns(), row)
        else:
            text = row.get(spec.prompt_column)
        tokens = text if isinstance(text, RowError) else check_text(text) or encode(text)
        column = spec.max_new_tokens_column
        limit = row_limit(row.get(column) if column else None, params.max_new_tokens, context)
        prepared = limit if isinstance(limit, RowError) else prepare_prompt(tokens, limit, context, params)
        if isinstance(prepared, RowError):
            errors += 1
            continue
        if len(prepared) < len(tokens):
            cut_rows, cut_tokens = cut_rows + 1, cut_tokens + len(tokens) - len(prepared)
        prompts.append(prepared)
        limits.append(limit)
    n = params.num_return_sequences
    figures = {"prompt_tokens": sum(map(len, prompts)), "generated_tokens_at_most": n * sum(limits),
               "prompts_truncated": cut_rows, "prompt_tokens_truncated": cut_tokens, "error_rows": errors,
               "cached_prompt_tokens": shared_prefix_tokens(prompts) if spec.enable_prefix_caching else 0}  # fmt: skip
    warnings = []
    if cut_rows and cut_rows * 2 >= len(rows):
        warnings.append(f"{cut_rows / len(rows):.0%} of the sampled prompts would be cut from the left to fit "
                        f"max_new_tokens={params.max_new_tokens} in the context of {context} tokens")  # fmt: skip
    return figures, warnings


def score_tokens(spec, rows, encode, context: int, eos: int) -> dict:
    """A score job's tokens, its rolling windows and the positions they compute."""
    from .scoring import rolling_windows

    tokens = windows = positions = errors = 0
    for row in rows:
        text = row.get(spec.text_column)
        if check_text(text) is not None:
            errors += 1
            continue
        ids = encode(text)
        w = rolling_windows(ids, eos, context, spec.stride)
        tokens, windows, positions = (
            tokens + len(ids),
            windows + len(w),
            positions + sum(len(s) - 1 for s, _ in w),
        )
    return {"tokens": tokens, "windows": windows, "positions_computed": positions, "error_rows": errors}


def judge_tokens(spec, rows, encode) -> dict:
    """A judge job's statements and their tokens."""
    from .judging import statement_lists

    def column(name):
        return [r.get(name) for r in rows] if name else None

    items = statement_lists(column(spec.candidates_column), column(spec.question_column if spec.answers_column else None),
                            column(spec.answers_column), spec.template)  # fmt: skip
    good = [s for s in items if isinstance(s, list)]
    return {"tokens": sum(len(encode(t)) for s in good for t in s), "statements": sum(map(len, good)),
            "error_rows": len(items) - len(good)}  # fmt: skip
