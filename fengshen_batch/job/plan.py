"""`fengshen-batch plan`: what a job would do, without starting Ray or loading a model.

The same checks as a run (spec, inputs' footers, output, the model's config.json), the same shards (and how
many an earlier run already committed), then a sample of rows read from shards spread over the input and
tokenized with the model's own tokenizer: tokens per row as the job would count them (generate: the prompt
after the job's truncation, and the shared prefixes the cache would serve; score: each text's tokens and its
rolling windows; judge: every candidate statement's), scaled to all rows. Wall time and device-hours come
from the rates in `rates.py`, which name the benchmark runs they were measured in. With every row in the
sample the token figures are exact: what the job's manifest will count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..io.inputs import make_shards, read_shard
from ..io.outputs import OutputStore, spec_hash
from ..io.redact import redact_url
from ..kinds import get
from .checks import check_job
from .rates import RATES, scale

SAMPLE_ROWS = 2000  # rows tokenized at most, from up to SAMPLE_SHARDS shards spread over the input
SAMPLE_SHARDS = 8


@dataclass(frozen=True)
class Plan:
    """What `fengshen-batch plan` prints, as data (`fb.plan(job)` returns it)."""

    kind: str
    output: str
    files: int
    rows: int
    shards: int
    committed_shards: int  # by an earlier run of this same configuration (a rerun resumes after them)
    already_complete: bool
    sampled_rows: int
    tokens: dict  # the kind's token figures, for all rows (exact when sampled_rows == rows)
    estimate: dict  # device, rates' source, seconds, device_hours
    warnings: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return self.sampled_rows == self.rows

    def lines(self) -> list[str]:
        approx = "" if self.exact else f" (from a sample of {self.sampled_rows:,} rows, scaled)"
        out = [f"{self.kind} job -> {self.output}",
               f"input: {self.rows:,} rows in {self.files:,} files, {self.shards:,} shards"
               + (f" ({self.committed_shards:,} already committed: a run resumes after them)" if self.committed_shards else "")]  # fmt: skip
        if self.already_complete:
            out.append("already complete: the output holds this job, finished; a run does nothing")
        out.append(f"tokens{approx}: " + ", ".join(f"{k.replace('_', ' ')} {v:,.0f}" if isinstance(v, (int, float))
                                                   else f"{k.replace('_', ' ')} {v}" for k, v in self.tokens.items()))  # fmt: skip
        e = self.estimate
        scaled = "" if e["scale"] == 1 else f", scaled {e['scale']:.3g}x for this model"
        out.append(f"estimate: {_duration(e['seconds'])} of compute on {e['actors']} x {e['device']}"
                   f" ({e['device_hours']:,.2f} {e['unit']}-hours), start-up not included; rates from {e['source']}"
                   f"{scaled}")  # fmt: skip
        return out + [f"warning: {w}" for w in self.warnings]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:,.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:,.1f} min"
    return f"{seconds / 3600:,.1f} h"


def _sample(spec, inputs, shards) -> list[dict]:
    """Up to SAMPLE_ROWS rows: the first rows of up to SAMPLE_SHARDS shards spread evenly over the input."""
    if not shards:
        return []
    k = min(len(shards), SAMPLE_SHARDS)
    picked = sorted({round(i * (len(shards) - 1) / max(1, k - 1)) for i in range(k)})
    per = math.ceil(SAMPLE_ROWS / len(picked))
    rows = []
    for i in picked:
        table = read_shard(shards[i], spec.storage, inputs.id_column, spec.drop_columns)
        rows += table.slice(0, per).to_pylist()
    return rows


def _estimate(spec, tokens: dict, config: dict) -> dict:
    device = "cpu" if spec.gpus_per_actor == 0 else "gpu"
    r = RATES[device]
    k = scale(config, r["shape"])
    seconds = get(spec.kind).plan_seconds(tokens, r) * k
    actors = spec.actors[1]
    per_actor = (spec.gpus_per_actor or 1) if device == "gpu" else spec.cpus_per_actor
    return {"device": r["device"].split(",")[0] if k != 1 else r["device"], "source": r["source"], "scale": k,
            "actors": actors, "seconds": seconds / actors, "unit": "GPU" if device == "gpu" else "CPU",
            "device_hours": seconds / 3600 * per_actor}  # fmt: skip


def plan_job(spec) -> Plan:
    """The plan of `spec` (see the module); raises what a run would raise before Ray starts."""
    from ..kinds.planning import model_tokenizer

    record, inputs, kind_context = check_job(spec, lambda _: None)
    shards = make_shards(inputs.files, spec.shard_rows)  # sampled by range: each route's holds a share
    routes = kind_context.get("routes", 1)
    store, hash_ = OutputStore(spec.output, spec.storage), spec_hash(record)
    published = store.published_manifest()
    committed = sum(m.get("spec_hash") == hash_ for m in store.committed().values())
    rows = _sample(spec, inputs, shards)
    tokenizer, config, context = model_tokenizer(spec)
    tokens, warnings = get(spec.kind).plan_tokens(spec, rows, tokenizer, context)
    if rows and len(rows) < inputs.rows:  # scaled to every row
        tokens = {k: round(v * inputs.rows / len(rows)) for k, v in tokens.items()}
    return Plan(spec.kind, redact_url(spec.output), len(inputs.files), inputs.rows, len(shards) * routes, committed,
                bool(published and published.get("spec_hash") == hash_), len(rows), tokens,
                _estimate(spec, tokens, config), warnings)  # fmt: skip
