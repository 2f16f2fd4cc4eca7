"""The contract every job kind keeps: what its rows need, what it computes, what it writes, and what the
driver does with its shards' summaries. A kind is one module in this folder with one `Kind` subclass; the
actors, the writer, the schemas and the driver ask it (`kinds.get(spec.kind)`) instead of branching on a
name. Importing a kind imports no torch: its model work (`scoring`, `generation`, `judging`) loads inside
the methods the actors call, so the driver can hold a kind too.
"""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

# Score jobs with a reference model: the same figures under it, and the Moore-Lewis difference.
REFERENCE_FIELDS = [
    pa.field("ref_nll_sum", pa.float64()),
    pa.field("ref_token_count", pa.int64()),
    pa.field("ref_ppl", pa.float64()),
    pa.field("ref_bits_per_byte", pa.float64()),
    pa.field("bpb_diff", pa.float64()),  # bits_per_byte - ref_bits_per_byte: lower = more like the target
]
# token_logprobs: true (score and generate jobs)
TOKEN_FIELDS = [
    pa.field("token_ids", pa.list_(pa.int32())),
    pa.field("token_logprobs", pa.list_(pa.float32())),
]


class Kind:
    """One job kind. Class attributes say how its work is scheduled; methods do the kind's part of each
    step. Defaults fit the scoring-like kinds (one output row per input row, shards in slices)."""

    name: ClassVar[str]
    fields: ClassVar[list[pa.Field]]  # its result columns, in order, before any option's
    # In an actor: True feeds the whole shard to the engine at once (it schedules per step); False runs
    # slices of `batch_size` rows, one shard computing while the other is read or written (a lock).
    whole_shard: ClassVar[bool] = False
    # What the progress line says while the first rows compute.
    first_step: ClassVar[str] = "first batch"
    # Processors: whether a dataset without the id column is refused (generation seeds samples by id).
    needs_ids: ClassVar[bool] = False

    # --- columns -------------------------------------------------------------------------------------
    def result_fields(self, spec) -> list[pa.Field]:
        """The columns the job adds to its input's, in order: the kind's, then those its options ask for."""
        fields = list(self.fields)
        if getattr(spec, "reference_model", None):
            fields += REFERENCE_FIELDS
        if getattr(spec, "token_logprobs", False):
            fields += TOKEN_FIELDS
        return fields

    def result_names(self, spec) -> list[str]:
        """Every column name the job writes besides its input's, before any `result_prefix`."""
        dedup = ["dup_cluster", "dup_keep"] if getattr(spec, "dedup", None) else []  # added after the run
        return [f.name for f in self.result_fields(spec)] + dedup

    # --- in an actor -----------------------------------------------------------------------------------
    def engine(self, spec, replica):
        """A long-lived engine over the actor's replica, or None (the kind calls the replica directly)."""
        return None

    def items(self, spec, table: pa.Table, extra: dict[str, list], ids: list[str]) -> list:
        """Each row's input to `run` (its text by default); `extra` takes result columns that are known
        before the model runs (one value per input row); `ids`: the rows' ids."""
        return table.column(spec.text_field).to_pylist()

    def route_rows(self, spec, table: pa.Table, ids: list[str], routes: int) -> list[int]:
        """Each row's route of `routes` (which replicas compute it), for kinds whose rows share work that
        one replica should do once (`before_run` returns {"routes": n} to ask for routing)."""
        return [0] * len(ids)

    def run(self, replicas, spec, items: list, ids: list[str], budget: int, usage) -> tuple[list, int]:
        """Results (or RowErrors) for `items`, in order, and the token budget that fit."""
        raise NotImplementedError

    def rows(self, result) -> list[dict]:
        """The output rows of one good result: result values by column name."""
        raise NotImplementedError

    def tokens(self, good: pa.Table) -> int:
        """Tokens the model processed for these good output rows (the shard's count, the progress line's)."""
        raise NotImplementedError

    def prepare_data(self, spec, data: pa.Table) -> pa.Table:
        """A shard's data rows as written (a column known at write time may be added)."""
        return data

    def dedup_fields(self, spec, renamed: dict[str, str]) -> tuple[str, str, str]:
        """`dedup:`: the columns of a shard's data holding each sample's own text, its NLL sum and its
        token count (kinds that dedup: generate, score)."""
        raise NotImplementedError

    def signatures(self, spec, data: pa.Table, renamed: dict[str, str], shard: int) -> pa.Table:
        """`dedup:`: the shard's signature file, a row per row of `data` (dedup/minhash.py)."""
        from ..dedup.minhash import signature_table

        text, nll_sum, count = self.dedup_fields(spec, renamed)
        sums, counts = data.column(nll_sum).to_pylist(), data.column(count).to_pylist()
        nll = [s / c if s is not None and c else None for s, c in zip(sums, counts, strict=True)]
        return signature_table(shard, data.column(text).to_pylist(), nll, spec.dedup.signature_settings())

    def summarize(self, spec, data: pa.Table, renamed: dict[str, str], id_field: str) -> dict | None:
        """What the driver adds up across shards instead of reading the output back (None: nothing).
        `renamed`: the input columns that go by an alias in `data` (named like a result)."""
        return None

    # --- on the driver -----------------------------------------------------------------------------------
    def check_model(self, spec, config: dict) -> None:
        """Refuse settings the model cannot run, from its config.json, before Ray starts (a SpecError)."""

    def before_run(self, spec, record: dict, progress) -> dict:
        """Checks and reads the kind needs before Ray starts; their results, kept for `finish`."""
        return {}

    def before_shards(self, plan, gpus: float, tasks: dict, progress) -> None:
        """What the kind does on Ray before the shards run and any model loads, once the shards still to do
        and each actor's GPUs are known (a score job's reuse lookup); it may add to `plan.context`.
        `tasks`: the cluster-wide steps it may call (`find_reused`: workers/reuse.py)."""

    def merge(self, summaries: list[dict]) -> dict:
        """One summary of many shards' (any order)."""
        from ..io.outputs import sum_counts

        return sum_counts(summaries)

    def add_to_manifest(self, spec, manifest: dict, shards: list[dict]) -> None:
        """Figures the kind adds to the manifest from the shards' records (before `finish`)."""

    def finish(self, spec, store, manifest: dict, summary: dict | None, context: dict) -> None:
        """What the kind does once every shard is committed and before _SUCCESS (report, accuracy, ...),
        from the shards' merged summary (None where a shard has none); `context`: `before_run`'s."""

    def plan_tokens(self, spec, rows: list[dict], tokenizer, context: int) -> tuple[dict, list[str]]:
        """`plan`: the token figures of a sample of input rows as this kind counts them, and any warnings."""
        from .planning import score_tokens

        return score_tokens(spec, rows, tokenizer.encode, context, tokenizer.eos_token_id), []

    def plan_seconds(self, tokens: dict, rates: dict) -> float:
        """`plan`: compute seconds of `plan_tokens`' figures at `rates` (job/rates.py), the benchmark's model."""
        return tokens.get("positions_computed", tokens["tokens"]) / rates["score_tokens_per_s"]

    def token_note(self, manifest: dict) -> str:
        """The `done:` line's tokens and rate."""
        return f"{manifest['counts']['tokens']:,} tokens, {manifest['tokens_per_second']:,.0f} tokens/s"

    def done_note(self, manifest: dict) -> str:
        """What the kind adds to the job's `done:` line."""
        return ""

    def report_lines(self, manifest: dict, context: dict) -> list[str]:
        """Lines for the user after the `done:` line."""
        return []

    def rebuild_report(self, store, manifest: dict, by: str | None, summaries: list, compare) -> dict:
        """`fengshen-batch report`: OUTPUT/report/ rebuilt from the shards' summaries."""
        from ..errors import JobError

        raise JobError(
            f"{store.url} is the output of a {self.name} job, which has no report (score and generate do)"
        )


def list_tokens(column: pa.ChunkedArray) -> int:
    """The sum of a column of token counts, flattened first if it holds a list per row."""
    values = pc.list_flatten(column) if pa.types.is_list(column.type) else column
    return int(pc.sum(values).as_py() or 0)
