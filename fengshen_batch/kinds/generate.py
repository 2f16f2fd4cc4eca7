"""Generate jobs: `num_return_sequences` samples of each prompt (the input's column, or a template filled from
its columns), through one long-lived engine per replica, with per-row limits, best-of-n and a report."""

from __future__ import annotations

import time

import pyarrow as pa

from ..errors import SpecError
from .base import Kind
from .rows import RowError, Sample, fill_template


def prompt_field(spec, renamed: dict[str, str]) -> str | None:
    """The prompts' column in a shard's internal data (for the report's examples), if it has one: the
    filled-in prompt where a template's is kept, else the input's (by its alias, `renamed`)."""
    if spec.prompt_template:
        return spec.prompt_column if spec.keep_prompt else None
    return renamed.get(spec.prompt_column, spec.prompt_column)


def constrained(spec) -> bool:
    return spec.constraint is not None or spec.constraint_column is not None


class Generate(Kind):
    name = "generate"
    fields = [
        pa.field("sample_index", pa.int32()),
        pa.field("generation", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("generated_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
        pa.field("generation_nll_sum", pa.float64()),
    ]
    whole_shard = True  # the engine admits the next shard's prompts as the current one's samples finish
    first_step = "first prefill (the first tokens come next)"
    needs_ids = True  # samples are seeded by row id

    def result_fields(self, spec) -> list[pa.Field]:
        fields = super().result_fields(spec)
        if constrained(spec):
            fields.insert(len(self.fields), pa.field("constraint_satisfied", pa.bool_()))
        if spec.few_shot:  # the examples each prompt held, and the prompt tokens the prefix cache supplied
            fields.insert(len(self.fields), pa.field("few_shot_ids", pa.list_(pa.string())))
            fields.insert(len(self.fields), pa.field("cached_prompt_tokens", pa.int32()))
        if spec.prompt_template and spec.keep_prompt:
            fields.insert(0, pa.field(spec.prompt_column, pa.string()))  # the filled-in prompt
        return fields

    def check_model(self, spec, config: dict) -> None:
        context = config.get("n_positions") or config.get("n_ctx")
        if context and spec.max_new_tokens >= context:
            raise SpecError(
                f"max_new_tokens={spec.max_new_tokens} leaves no room for a prompt in the model's context of "
                f"{context} tokens: give at most {context - 1}"
            )

    def engine(self, spec, replica):
        from ..engine.llm_engine import EngineThread, LLMEngine

        threads = None if replica.device.type == "cuda" else max(1, int(spec.cpus_per_actor))
        return EngineThread(
            LLMEngine(replica, spec.params(), spec.engine_params(), spec.token_budget), threads
        )

    def items(self, spec, table, extra, ids):
        """(prompt, the row's max_new_tokens or None, its constraint or None) per row; a template that
        cannot be filled, or a constraint that is not one, is the row's error."""
        if spec.prompt_template:
            names = spec.template_columns()
            prompts = [
                fill_template(spec.prompt_template, names, row) for row in table.select(names).to_pylist()
            ]
            if spec.keep_prompt:
                extra[spec.prompt_column] = [p if isinstance(p, str) else None for p in prompts]
        else:
            prompts = table.column(spec.text_field).to_pylist()
        if spec.few_shot:
            prompts = self._with_examples(spec, table, ids, prompts, extra)
        column = spec.max_new_tokens_column
        limits = table.column(column).to_pylist() if column else [None] * len(prompts)
        constraints = [None] * len(prompts)
        if spec.constraint_column:
            from ..constraints import row_constraint

            parsed = [row_constraint(v) for v in table.column(spec.constraint_column).to_pylist()]
            constraints = [RowError("bad_constraint", c[:2000]) if isinstance(c, str) else c for c in parsed]
        return list(zip(prompts, limits, constraints, strict=True))

    @staticmethod
    def _with_examples(spec, table, ids, parts, extra) -> list:
        """Each row's prompt: its drawn examples' header, then its own part (a row part that is not text
        stays the row's error); `few_shot_ids` records the examples in prompt order."""
        from .few_shot import draw_for

        draw, by = draw_for(spec), spec.few_shot.stratify_by
        strata = table.column(by).to_pylist() if by else [None] * len(parts)
        prompts, chosen_ids = [], []
        for row_id, stratum, part in zip(ids, strata, parts, strict=True):
            chosen = draw.examples(row_id, stratum)
            if isinstance(part, str) and part and not isinstance(chosen, RowError):
                prompts.append(draw.header(chosen) + part)
                chosen_ids.append([draw.pool.ids[i] for i in chosen])
                continue
            # the row's own error first (a null or a template's), then the draw's, then an empty part's
            prompts.append(chosen if isinstance(part, str) and isinstance(chosen, RowError) else part)
            chosen_ids.append(None)
        extra["few_shot_ids"] = chosen_ids
        return prompts

    def before_run(self, spec, record, progress) -> dict:
        """Few-shot: the examples read and checked against the model's context before any model loads; the
        pool's fingerprint joins the job's identity (a changed pool is another job). With `sets` on a fixed
        pool of several replicas, rows are routed by header (`routes`: each header computed on one)."""
        if not spec.few_shot:
            return {}
        from .few_shot import check_pool, new_draw, read_pool
        from .planning import model_tokenizer

        pool = read_pool(spec.few_shot, spec.storage)
        tokenizer, _, context = model_tokenizer(spec)
        check_pool(spec, pool, tokenizer, context)
        record["few_shot_examples_fingerprint"] = pool.fingerprint
        lo, hi = spec.actors
        routed = lo == hi > 1 and new_draw(spec.few_shot, pool, spec.seed).route_table(hi) is not None
        return {"routes": hi if routed else 1}

    def route_rows(self, spec, table, ids, routes) -> list[int]:
        from .few_shot import draw_for

        if not spec.few_shot:
            return [0] * len(ids)
        draw, by = draw_for(spec), spec.few_shot.stratify_by
        strata = table.column(by).to_pylist() if by else [None] * len(ids)
        return [draw.route(i, s, routes) for i, s in zip(ids, strata, strict=True)]

    def run(self, replicas, spec, items, ids, budget, usage):
        from .generation import generate, keep_best

        prompts, limits, constraints = zip(*items, strict=True) if items else ((), (), ())
        results = generate(
            replicas.model, prompts, ids, spec.params(), limits, replicas.engine, usage, constraints
        )
        if spec.keep_best:
            results = [r if isinstance(r, RowError) else keep_best(r, spec.keep_best) for r in results]
        return results, budget

    def rows(self, samples: list[Sample]) -> list[dict]:
        return [
            {"sample_index": s.sample_index, "generation": s.generation, "prompt_tokens": s.prompt_tokens,
             "generated_tokens": s.generated_tokens, "finish_reason": s.finish_reason,
             "generation_nll_sum": s.generation_nll_sum, "token_ids": s.token_ids, "token_logprobs": s.token_logprobs,
             "constraint_satisfied": s.constraint_satisfied, "cached_prompt_tokens": s.cached_prompt_tokens}
            for s in samples
        ]  # fmt: skip

    def dedup_fields(self, spec, renamed):
        return "generation", "generation_nll_sum", "generated_tokens"  # the sample's own text, not its prompt

    def tokens(self, good: pa.Table) -> int:
        """Generated tokens: a shard's prompts are counted once each from its engine's usage (a prompt's
        tokens repeat on each of its samples' rows)."""
        import pyarrow.compute as pc

        return int(pc.sum(good.column("generated_tokens")).as_py() or 0)

    def summarize(self, spec, data, renamed, id_field):
        from ..reports.generate_sketch import summarize

        return summarize(data, prompt_field(spec, renamed), spec.report_by, id_field)

    def merge(self, summaries):
        from ..reports.generate_sketch import merge

        return merge(summaries)

    def add_to_manifest(self, spec, manifest, shards) -> None:
        """Prompt tokens (one prefill per prompt), those the prefix cache supplied and those computed,
        added up from the shards' records (markers of older versions count nothing)."""
        prompt = sum(m.get("prompt_tokens", 0) for m in shards)
        cached = sum(m.get("cached_prompt_tokens", 0) for m in shards)
        counts, generated = manifest["counts"], manifest["counts"]["tokens"]
        manifest["generated_tokens_per_second"] = manifest["tokens_per_second"]
        if generated:  # the shards counted generated tokens; the job's tokens are those and the prompts'
            manifest["tokens_per_second"] = round(
                manifest["tokens_per_second"] * (prompt + generated) / generated, 1
            )
        counts.update(
            tokens=prompt + generated,
            generated_tokens=generated,
            prompt_tokens=prompt, cached_prompt_tokens=cached, prefilled_prompt_tokens=prompt - cached,
            truncated_prompts=sum(m.get("truncated_prompts", 0) for m in shards),
            truncated_prompt_tokens=sum(m.get("truncated_prompt_tokens", 0) for m in shards),
        )  # fmt: skip
        manifest["prefix_cache_hit_rate"] = round(cached / max(1, prompt), 4)

    def finish(self, spec, store, manifest, summary, context) -> None:
        from ..reports.generate_report import build_sample_report

        took, t = manifest.setdefault("finish_seconds", {}), time.time()
        if spec.keep_best:  # samples generated and not kept: each good row made n samples and kept k of them
            n, k = spec.num_return_sequences, spec.keep_best
            manifest["counts"]["dropped_samples"] = manifest["counts"]["result_rows"] // k * (n - k)
        figures = build_sample_report(store, manifest, spec.report_by, [summary])
        if "constraint" in figures:  # satisfied, cut at the limit, failed: from the shards' summaries
            manifest["counts"]["constraint"] = figures["constraint"]
        took["report"] = round(time.time() - t, 3)

    def plan_tokens(self, spec, rows, tokenizer, context):
        from .planning import generate_tokens

        return generate_tokens(spec, rows, tokenizer.encode, context)

    def plan_seconds(self, tokens, rates):
        prefill = tokens["prompt_tokens"] - tokens["cached_prompt_tokens"]
        return (
            prefill / rates["prefill_tokens_per_s"]
            + tokens["generated_tokens_at_most"] / rates["decode_tokens_per_s"]
        )

    def token_note(self, manifest) -> str:
        counts = manifest["counts"]
        return (
            f"{counts['prompt_tokens']:,} prompt + {counts['generated_tokens']:,} generated tokens, "
            f"{manifest['generated_tokens_per_second']:,.0f} generated tokens/s"
        )

    def done_note(self, manifest) -> str:
        note = f", prefix cache hit rate {manifest['prefix_cache_hit_rate']:.0%}"
        c = manifest["counts"].get("constraint")
        if c:
            note += f", constraint satisfied by {c['satisfied']:,} of {c['samples']:,} samples"
            if c["cut"] or c["failed"]:
                note += f" ({c['cut']:,} cut by the token limit, {c['failed']:,} failed)"
        return note

    def report_lines(self, manifest, context) -> list[str]:
        """A warning where prompts were cut to fit: the prompt column and the report show them whole."""
        counts = manifest["counts"]
        cut = counts.get("truncated_prompts", 0)
        if not cut:
            return []
        return [
            f"warning: {cut} prompts were cut from the left to fit max_new_tokens in the model's context "
            f"({counts['truncated_prompt_tokens']:,} tokens dropped, `counts.truncated_prompts` in the manifest); "
            "a shorter max_new_tokens keeps them whole, prompt_too_long: error refuses them"
        ]

    def rebuild_report(self, store, manifest, by, summaries, compare):
        from ..reports.generate_report import build_sample_report

        return build_sample_report(store, manifest, by, summaries)


KIND = Generate()
