"""Score jobs: the perplexity and bits per byte of each text (lm-eval `loglikelihood_rolling`), optionally
under a reference model too (Moore-Lewis), with CCNet buckets, a report, and a comparison with an earlier
night's output (baseline and drift)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace

import pyarrow as pa

from .base import Kind, list_tokens
from .rows import RowError, ScoreResult

# What a row's content key is: a later job's `reuse` matches rows by it, so a change here is a new version.
CONTENT_KEY = "blake2b-128/utf-8"


def content_digest(text: str) -> bytes:
    """A scored text's content key as 16 bytes: BLAKE2b-128 over its UTF-8 bytes (the reuse lookup's form).
    The same text has the same key in any file, row order or night; the model, tokenizer and settings it
    was scored under are the output's identity (its manifest), not the key's."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def content_key(text: str) -> str:
    """The content key as written in the `content_key` column: its 32 hex digits."""
    return content_digest(text).hex()


def _with_reference(main: list, ref: list) -> list:
    """Each text's result under the model with its result under the reference attached; a text the
    reference cannot score is a row error too."""
    return [m if isinstance(m, RowError) else r if isinstance(r, RowError) else replace(m, reference=r)
            for m, r in zip(main, ref, strict=True)]  # fmt: skip


class Score(Kind):
    name = "score"
    fields = [
        pa.field("nll_sum", pa.float64()),
        pa.field("token_count", pa.int64()),
        pa.field("ppl", pa.float64()),
        pa.field("byte_count", pa.int64()),
        pa.field("bits_per_byte", pa.float64()),
    ]

    def result_fields(self, spec) -> list[pa.Field]:
        return [*super().result_fields(spec), pa.field("content_key", pa.string())]

    def items(self, spec, table, extra, ids):
        """Each row's text; its content key beside it (`content_key`, known before the model runs)."""
        texts = table.column(spec.text_field).to_pylist()
        extra["content_key"] = [content_key(t) if isinstance(t, str) else None for t in texts]
        return texts

    def result_names(self, spec) -> list[str]:
        names = super().result_names(spec)
        return names + ["bucket"] if spec.bucket_quantiles or spec.bucket_thresholds else names

    def run(self, replicas, spec, items, ids, budget, usage):
        from .scoring import score_texts

        results, budget = score_texts(replicas.model, items, spec.params(), budget, spec.token_logprobs)
        if replicas.reference is not None:
            ref, budget = score_texts(replicas.reference, items, spec.params(), budget)
            results = _with_reference(results, ref)
        return results, budget

    def rows(self, r: ScoreResult) -> list[dict]:
        row = {"nll_sum": r.nll_sum, "token_count": r.token_count, "ppl": r.ppl, "byte_count": r.byte_count,
               "bits_per_byte": r.bits_per_byte, "token_ids": r.token_ids, "token_logprobs": r.token_logprobs}  # fmt: skip
        if (ref := r.reference) is not None:
            row |= {"ref_nll_sum": ref.nll_sum, "ref_token_count": ref.token_count, "ref_ppl": ref.ppl,
                    "ref_bits_per_byte": ref.bits_per_byte, "bpb_diff": r.bits_per_byte - ref.bits_per_byte}  # fmt: skip
        return [row]

    def dedup_fields(self, spec, renamed):
        return renamed.get(spec.text_column, spec.text_column), "nll_sum", "token_count"

    def tokens(self, good: pa.Table) -> int:
        return list_tokens(good.column("token_count"))

    def prepare_data(self, spec, data: pa.Table) -> pa.Table:
        if not spec.bucket_thresholds:
            return data
        from ..reports.buckets import with_buckets  # fixed cutoffs: the bucket is known at write time

        return with_buckets(data, list(spec.bucket_thresholds), spec.bucket_by)

    def summarize(self, spec, data, renamed, id_field):
        from ..reports.score_sketch import summarize

        return summarize(data, spec.text_column, spec.report_by, id_field)

    def before_run(self, spec, record, progress) -> dict:
        """The model's fingerprint (what a later job's baseline check compares: a few small reads), and the
        baseline, read and checked now so that a bad one fails before any model loads."""
        from ..io.storage import storage_options
        from ..model.source import model_fingerprint
        from ..reports.baseline import BaselineMissing, load_baseline

        context = {"fingerprint": model_fingerprint(spec.model, storage_options(spec.model, spec.storage))}
        record["content_key"] = CONTENT_KEY  # part of the output's identity: how its rows can be matched
        if spec.baseline:
            try:
                context["baseline"] = load_baseline(
                    spec.baseline, spec.storage, record, context["fingerprint"], spec.baseline_check
                )
            except BaselineMissing as e:
                if spec.baseline_missing == "fail":
                    raise
                context["skipped"] = f"{e}; no comparison (baseline_missing: skip)"
                progress(context["skipped"])
        if spec.reuse:  # each earlier output checked now, so that a wrong one fails before any model loads
            from .reuse import check_reuse

            context["reuse"], context["reuse_skipped"] = check_reuse(
                spec, record, context["fingerprint"], progress
            )
        return context

    def before_shards(self, plan, gpus, tasks, progress) -> None:
        """`reuse`: the earlier outputs' devices checked against tonight's (`gpus` per actor), then the
        lookup (`tasks["find_reused"]`, workers/reuse.py) of the shards still to do, whose matches wait
        under OUTPUT/_reuse/ for the actors."""
        if not plan.spec.reuse:
            return
        from dataclasses import asdict

        from .reuse import check_devices, match_schema

        sources, skipped = check_devices(plan.spec, plan.context.get("reuse") or [], gpus, progress)
        plan.context["reuse"] = sources
        plan.context["reuse_skipped"] = plan.context.get("reuse_skipped", []) + skipped
        if not sources or not plan.todo:
            return

        t = time.time()
        todo = [asdict(s) for s in plan.todo]
        found = tasks["find_reused"](plan.spec, sources, todo, plan.target.url, match_schema(plan.spec))
        plan.context["reuse_lookup"] = took = round(time.time() - t, 3)
        rows = round(sum(s.planned_rows for s in plan.todo))
        progress(
            f"reuse: {sum(found):,} of {rows:,} rows found in {len(sources)} earlier output(s) ({took:.1f}s)"
        )

    def add_to_manifest(self, spec, manifest, shards) -> None:
        if spec.reuse:  # the rows and tokens each shard took from earlier outputs, added up
            from ..io.outputs import sum_counts

            manifest["reuse"] = {"reused_rows": sum(m.get("reused", 0) for m in shards),
                                 "reused_tokens": sum(m.get("reused_tokens", 0) for m in shards),
                                 "from": sum_counts([m.get("reused_from", {}) for m in shards])}  # fmt: skip

    def done_note(self, manifest) -> str:
        reuse = manifest.get("reuse")
        return f", {reuse['reused_rows']:,} rows reused" if reuse else ""

    def merge(self, summaries):
        from ..reports.score_sketch import merge

        return merge(summaries)

    def finish(self, spec, store, manifest, summary, context) -> None:
        """Quantile buckets (each data file rewritten with its bucket, in parallel tasks), then the report
        from the shards' merged summary, compared with the baseline."""
        from ..reports import score_sketch
        from ..reports.histograms import quantile
        from ..reports.score_report import build_report
        from ..reports.summaries import merged_summary

        if context.get("fingerprint"):
            manifest["model_fingerprint"] = context["fingerprint"]
        if context.get("skipped"):
            manifest["baseline_skipped"] = context["skipped"]
        if "reuse" in manifest:  # by output, under its (redacted) URL
            reuse, by = manifest["reuse"], manifest["reuse"].pop("from")
            manifest["reuse"] = {
                "outputs": [
                    {"output": s.shown, "rows": by.get(str(n), 0)} for n, s in enumerate(context["reuse"])
                ],
                "reused_rows": reuse["reused_rows"],
                "computed_rows": manifest["counts"]["result_rows"] - reuse["reused_rows"],
                "reused_tokens": reuse["reused_tokens"],
                "lookup_seconds": context.get("reuse_lookup"),
                "skipped": context.get("reuse_skipped", []),
            }
        took, t = manifest.setdefault("finish_seconds", {}), time.time()
        # older shards (no summary in their markers): from the files
        summary = merged_summary(
            store, score_sketch, spec.text_column, spec.report_by, [summary], prefix=spec.result_prefix,
            id_column=spec.id_column or "id",
        )  # fmt: skip
        if spec.bucket_thresholds:  # written with the data
            manifest["bucket_cutoffs"] = list(spec.bucket_thresholds)
        elif spec.bucket_quantiles:
            cutoffs = [quantile(summary[spec.bucket_by], q) for q in spec.bucket_quantiles]
            if None not in cutoffs:
                summary["buckets"] = self._rebucket(spec, store, cutoffs, context["map_files"])
                manifest["bucket_cutoffs"] = cutoffs
                took["buckets"] = round(time.time() - t, 3)
                t = time.time()
        threshold = spec.drift_threshold.model_dump() if spec.drift_threshold else None
        report = build_report(store, manifest, spec.report_by, [summary], context.get("baseline"), threshold)
        if "drift" in report:
            manifest["drift"] = report["drift"]
        if "comparison" in report:
            from ..reports.baseline import comparison_line

            manifest["baseline_comparison"] = comparison_line(report["comparison"], report.get("drift"))
        took["report"] = round(time.time() - t, 3)

    @staticmethod
    def _rebucket(spec, store, cutoffs: list[float], map_files) -> dict[str, int]:
        """Every data file rewritten whole with its bucket column; rows per bucket."""
        from ..io.outputs import DATA, sum_counts
        from ..reports.buckets import rebucket_files

        prefix = spec.result_prefix
        parts = map_files(
            rebucket_files, store.files(DATA), output_url=store.url, storage=spec.storage, cutoffs=cutoffs,
            column=prefix + spec.bucket_by, bucket=prefix + "bucket",
        )  # fmt: skip
        return sum_counts(parts)

    def report_lines(self, manifest, context) -> list[str]:
        lines = [manifest["baseline_comparison"]] if manifest.get("baseline_comparison") else []
        if context.get("skipped"):
            lines.append(f"baseline: {context['skipped']}")
        return lines

    def rebuild_report(self, store, manifest, by, summaries, compare):
        from ..reports.score_report import build_report

        base, threshold = compare()
        return build_report(store, manifest, by, summaries, base, threshold)


KIND = Score()
