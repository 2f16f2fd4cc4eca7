"""The job spec: one validated object per job, built at the entry point (CLI options or a YAML file).

A spec is checked before Ray starts or a model loads: an unknown key is an error that names it, a bad value
names the field and its allowed range. Specs hold no credentials (those come from the standard AWS
environment and config files), so a spec can be written beside the outputs as it is.
"""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .dedup.config import DedupOptions
from .errors import SpecError
from .io.redact import redact_record
from .io.spec_files import read_spec_fields
from .io.storage import StorageSpec
from .params import Dtype, EngineParams, GenerateParams, ScoreParams


class JobBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(default=None, pattern=r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
    model: str = Field(min_length=1, description="local dir, s3:// (or any fsspec) prefix, or hub id")
    input: str = Field(min_length=1, description="a Parquet file, a folder/prefix of them, or a glob")
    output: str = Field(min_length=1, description="output folder/prefix")
    id_column: str | None = None  # default: `id` if the input has one, else derived from file and row
    actors: tuple[int, int] = (1, 1)  # (min, max) replicas; min == max is a fixed pool
    gpus_per_actor: float | None = Field(default=None, ge=0)  # None: 1 if the cluster has GPUs, else 0
    cpus_per_actor: float = Field(default=1, gt=0)
    batch_size: int = Field(
        default=256, ge=1, description="scoring, judging: rows per engine call in a shard"
    )
    # Scoring: padded tokens per forward pass. Generation: prompt tokens prefilled per engine step.
    token_budget: int | None = Field(default=None, ge=16, description="tokens per forward pass")
    dtype: Dtype = "auto"
    shard_rows: int = Field(default=4096, ge=1, description="input rows per output shard")
    address: str | None = None  # Ray address; None: RAY_ADDRESS, else an embedded local Ray
    storage: StorageSpec = StorageSpec()
    trust_remote_code: bool = False
    # Input columns left out of the job and its output (e.g. last night's `ppl` when re-scoring).
    drop_columns: tuple[str, ...] = ()
    # Prefix of every result column (`new_` -> new_ppl, ...): re-scoring an output beside its old results.
    result_prefix: str = Field(default="", pattern=r"^([A-Za-z][A-Za-z0-9_]*)?$")
    # A rerun over shards or a finished run of this job whose input files changed since (a file new, changed
    # or gone): fail naming them, or recompute the shards they touched (job/resume.py).
    on_input_change: Literal["fail", "recompute"] = "fail"
    # For `fengshen-batch submit`: Ray runtime_env of the job (pip, env_vars, ...); never credentials.
    runtime_env: dict = Field(default_factory=dict)

    def __init__(self, **fields):
        """`ScoreJob(model=..., input=..., output=...)` from Python: a bad field is a SpecError, as in YAML."""
        try:
            super().__init__(**fields)
        except ValidationError as e:
            raise SpecError(f"invalid job spec: {_describe(e)}") from None

    @field_validator("drop_columns", mode="before")
    @classmethod
    def _columns_list(cls, value):
        return (value,) if isinstance(value, str) else value

    @field_validator("actors", mode="before")
    @classmethod
    def _actors(cls, value):
        """`N` or `MIN,MAX` (string, int or list)."""
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value, value)
        elif isinstance(value, str):
            parts = [p.strip() for p in value.split(",")]
            if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts):
                raise ValueError(f"actors must be N or MIN,MAX with whole numbers, got {value!r}")
            value = (int(parts[0]), int(parts[-1]))
        lo, hi = value
        if not 1 <= lo <= hi:
            raise ValueError(f"actors needs 1 <= MIN <= MAX, got {lo},{hi}")
        return (lo, hi)

    # Set by each kind: its engine parameters, and the spec field naming its text column.
    PARAMS: ClassVar[type[BaseModel]]
    TEXT_FIELD_KEY: ClassVar[str]

    @property
    def text_field(self) -> str:
        return getattr(self, self.TEXT_FIELD_KEY)

    def input_columns(self) -> tuple[list[str], list[str], list[str]]:
        """Input columns the job needs: (string columns, list<string> columns, columns of any type)."""
        return [self.text_field], [], []

    def number_columns(self) -> list[str]:
        """Input columns of whole numbers the job needs (per-row settings)."""
        return []

    def params(self):
        """The engine parameters of this job (the spec's copy of ScoreParams/GenerateParams fields)."""
        return self.PARAMS(**self.model_dump(include=set(self.PARAMS.model_fields)))


class DriftThreshold(BaseModel):
    """When a score job compared with a `baseline` has drifted: any limit passed, by the whole corpus or by a
    `report_by` group with at least `min_group_rows` rows on both sides (small groups are noise)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ppl_change: float | None = Field(default=None, gt=0)  # |today / baseline - 1| of corpus perplexity
    # |today / baseline - 1| of corpus bits per byte: per UTF-8 byte, so a source whose text turned into
    # another script or into noise moves it even where perplexity per token barely moves
    bpb_change: float | None = Field(default=None, gt=0)
    ks: float | None = Field(default=None, gt=0, le=1)  # Kolmogorov-Smirnov distance of per-document ppl
    # |today / baseline - 1| of the rows or the tokens scored: a night's volume against the last one's
    volume_change: float | None = Field(default=None, gt=0)
    min_group_rows: int = Field(default=1000, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _number(cls, value):
        """A bare number is a corpus-perplexity change: `drift_threshold: 0.05` alerts at +-5%."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return {"ppl_change": value}
        return value

    @model_validator(mode="after")
    def _some_limit(self):
        if all(x is None for x in (self.ppl_change, self.bpb_change, self.ks, self.volume_change)):
            raise ValueError("drift_threshold needs ppl_change, bpb_change, ks or volume_change")
        return self


class ScoreJob(JobBase, ScoreParams, DedupOptions):
    model_config = ConfigDict(extra="forbid", frozen=True)
    PARAMS: ClassVar[type[BaseModel]] = ScoreParams
    TEXT_FIELD_KEY: ClassVar[str] = "text_column"

    kind: Literal["score"] = "score"
    text_column: str = "text"
    report_by: str | None = None  # a column (e.g. `source`) to break the report's figures down by
    # A `bucket` column (head/middle/tail by perplexity, as CCNet): cutoffs at these quantiles of the
    # corpus's perplexities, or at these fixed perplexities.
    bucket_quantiles: tuple[float, float] | None = None
    bucket_thresholds: tuple[float, float] | None = None
    bucket_by: Literal["ppl", "bits_per_byte", "bpb_diff"] = "ppl"  # the column buckets cut
    # A second model scoring every text in the same pass (Moore-Lewis filtering): ref_* columns and
    # bpb_diff = bits_per_byte - ref_bits_per_byte. Any source `model` accepts.
    reference_model: str | None = Field(default=None, min_length=1)
    token_logprobs: bool = False  # token_ids and token_logprobs columns (large: off by default)
    # An earlier score job's output to compare with (`s3://scores/{date-1}/`), read from its report and
    # markers, never its rows; one scored with another model, tokenizer or stride is refused unless
    # baseline_check is false.
    baseline: str | None = Field(default=None, min_length=1)
    baseline_check: bool = True
    # A baseline that is not there (a nightly's first night, or after a missed one): fail the job, or skip
    # the comparison and say so in the manifest (`baseline_skipped`) and on the screen.
    baseline_missing: Literal["fail", "skip"] = "fail"
    # Past this, the job still completes but exits with DRIFT_EXIT_CODE and manifest.drift.exceeded: true.
    drift_threshold: DriftThreshold | None = None
    # Earlier score outputs (`s3://scores/{date-1}/`, first listed first): a row whose text's content key is
    # found in one takes that output's result columns as they are, and only the rest reach the model. One
    # scored with another model, tokenizer, stride, dtype, reference model or without the token columns
    # asked for is refused; reuse_mismatch: skip leaves it out instead (and one not there, or unfinished).
    reuse: tuple[str, ...] = ()
    reuse_mismatch: Literal["fail", "skip"] = "fail"

    @field_validator("reuse", mode="before")
    @classmethod
    def _reuse_list(cls, value):
        value = (value,) if isinstance(value, str) else tuple(value or ())
        if any(not isinstance(v, str) or not v for v in value):
            raise ValueError("reuse takes output URLs (non-empty strings)")
        return value

    @model_validator(mode="after")
    def _drift_needs_a_baseline(self):
        if self.drift_threshold is not None and not self.baseline:
            raise ValueError("drift_threshold needs a baseline to compare with")
        return self

    @model_validator(mode="after")
    def _buckets(self):
        if self.bucket_quantiles and self.bucket_thresholds:
            raise ValueError("give bucket_quantiles or bucket_thresholds, not both")
        q = self.bucket_quantiles
        if q and not 0 < q[0] < q[1] < 1:
            raise ValueError("bucket_quantiles needs 0 < LOW < HIGH < 1")
        if self.bucket_by == "bpb_diff" and not self.reference_model:
            raise ValueError("bucket_by: bpb_diff needs a reference_model")
        t = self.bucket_thresholds
        if t and self.bucket_by == "bpb_diff" and not t[0] < t[1]:
            raise ValueError("bucket_thresholds needs LOW < HIGH")
        if t and self.bucket_by != "bpb_diff" and not 0 < t[0] < t[1]:
            raise ValueError(f"bucket_thresholds needs 0 < LOW < HIGH ({self.bucket_by} values)")
        return self

    def input_columns(self) -> tuple[list[str], list[str], list[str]]:
        return [self.text_column], [], [self.report_by] if self.report_by else []


def format_columns(template: str, what: str) -> list[str]:
    """The columns a format-syntax template names, in order of first use; ValueError naming `what`."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"{what} is not a valid format string: {e}") from None
    names = [re.split(r"[.\[]", f, maxsplit=1)[0] for f in fields]
    if any(n == "" or n.isdigit() for n in names):
        raise ValueError(f"{what} fields must name columns, e.g. {{topic}}; not {{}} or {{0}}")
    if not names:
        raise ValueError(f"{what} names no column (use {{column}}; {{{{ and }}}} for literal braces)")
    return list(dict.fromkeys(names))


class FewShot(BaseModel):
    """Few-shot prompts built by the job (kinds/few_shot.py): k examples per row drawn from `examples`,
    each through `example_template`, joined by `separator`, then the row's own part."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    examples: str = Field(min_length=1, description="a Parquet file, folder/prefix or glob of examples")
    k: int = Field(ge=1)
    example_template: str = Field(min_length=1)  # format syntax over the examples' columns
    separator: str = "\n\n"  # between examples, and between the last one and the row's part
    id_column: str = "id"  # the examples' ids: recorded in few_shot_ids; a row never gets its own
    stratify_by: str | None = None  # a column of both: a row draws from the examples of its own value
    seed: int | None = None  # None: the job's seed
    # Distinct example sets per stratum, each row taking one by its id (shared headers: the prefix cache
    # computes each once); None: k examples drawn for every row on its own.
    sets: int | None = Field(default=None, ge=1)
    # How sets are drawn: `tree` (sets share their leading examples, so their headers share cached blocks)
    # or `flat` (each set its own k examples: more distinct first examples, fewer cache hits).
    layout: Literal["tree", "flat"] = "tree"
    # A stratum with fewer than k examples (besides a row's own): refuse the job, or that stratum's rows' error.
    too_few: Literal["fail", "row_error"] = "fail"

    @model_validator(mode="after")
    def _template(self):
        format_columns(self.example_template, "few_shot.example_template")
        return self

    def template_columns(self) -> list[str]:
        return format_columns(self.example_template, "few_shot.example_template")


class GenerateJob(JobBase, GenerateParams, EngineParams, DedupOptions):
    model_config = ConfigDict(extra="forbid", frozen=True)
    PARAMS: ClassVar[type[BaseModel]] = GenerateParams
    TEXT_FIELD_KEY: ClassVar[str] = "prompt_column"

    kind: Literal["generate"] = "generate"
    # The input column of prompts; with a prompt_template, the output column of the filled-in prompts.
    prompt_column: str = "prompt"
    # Python format syntax over the input's columns ("Write a {style} article about {topic}."); a null in a
    # named column is that row's error. The filled prompt is written unless keep_prompt is false.
    prompt_template: str | None = Field(default=None, min_length=1)
    keep_prompt: bool = True
    # Keep the K samples of each prompt with the lowest NLL per token (best-of-n); the rest are counted.
    keep_best: int | None = Field(default=None, ge=1)
    token_logprobs: bool = False  # token_ids and token_logprobs of each generation (large: off by default)
    # An integer column of per-row output limits; null takes max_new_tokens. A bad value is that row's error.
    max_new_tokens_column: str | None = None
    # A column of per-row constraints: JSON text (or a struct) such as {"choice": ["yes", "no"]} or
    # {"json_schema": {...}}; null takes `constraint`. One that is not a constraint is that row's error.
    constraint_column: str | None = None
    # Few-shot prompts built from an examples table (see FewShot); the row's part follows the examples.
    few_shot: FewShot | None = None
    # Ray batches in flight per replica, all feeding its one engine, so it never drains between batches.
    max_concurrent_batches: int = Field(default=4, ge=1)
    report_by: str | None = None  # a column (e.g. `source`) to break the report's figures down by

    @model_validator(mode="after")
    def _template_and_best_of_n(self):
        if self.prompt_template is not None:
            self.template_columns()
        if self.constraint_column is not None and self.ignore_eos:
            raise ValueError("a constraint ends its output where the constraint is complete: drop ignore_eos")
        if self.keep_best is not None and self.keep_best >= self.num_return_sequences:
            raise ValueError(
                f"keep_best ({self.keep_best}) must be below num_return_sequences ({self.num_return_sequences})"
            )
        return self

    def template_columns(self) -> list[str]:
        """The input columns `prompt_template` names, in order of first use."""
        return format_columns(self.prompt_template, "prompt_template")

    def input_columns(self) -> tuple[list[str], list[str], list[str]]:
        stratum = self.few_shot.stratify_by if self.few_shot else None
        by = list(dict.fromkeys(c for c in (self.report_by, self.constraint_column, stratum) if c))
        if self.prompt_template is not None:
            return [], [], list(dict.fromkeys([*self.template_columns(), *by]))
        return [self.prompt_column], [], by

    def number_columns(self) -> list[str]:
        return [self.max_new_tokens_column] if self.max_new_tokens_column else []

    def engine_params(self) -> EngineParams:
        return EngineParams(**self.model_dump(include=set(EngineParams.model_fields)))


class JudgeJob(JobBase, ScoreParams):
    """Yuyuan-style fact judgment: score one statement per candidate, pick the least surprising."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    PARAMS: ClassVar[type[BaseModel]] = ScoreParams
    TEXT_FIELD_KEY: ClassVar[str] = "question_column"

    kind: Literal["judge"] = "judge"
    candidates_column: str | None = None  # list<string> of ready statements, or:
    question_column: str = "question"  # a question ...
    answers_column: str | None = None  # ... and a list<string> of answers, turned into statements by:
    template: str = "auto"  # built-in rules, or a format string with {question} and {answer}
    criterion: Literal["ppl", "nll", "bpb"] = "ppl"
    label_column: str | None = None  # the correct candidate (index or text): accuracy in the manifest
    threshold: float | None = None  # a single statement is judged true when its criterion value <= this
    report_by: str | None = None  # a column (e.g. `source`) to break the report's accuracy down by

    def input_columns(self) -> tuple[list[str], list[str], list[str]]:
        others = [c for c in (self.label_column, self.report_by) if c]
        if self.candidates_column:
            return [], [self.candidates_column], others
        return [self.question_column], [self.answers_column], others

    @model_validator(mode="after")
    def _one_source_of_candidates(self):
        if (self.candidates_column is None) == (self.answers_column is None):
            raise ValueError(
                "give exactly one of candidates_column (statements) and answers_column (answers)"
            )
        if self.template != "auto" and "{answer}" not in self.template:
            raise ValueError("template must contain {answer} (and usually {question})")
        return self


AnyJob = ScoreJob | GenerateJob | JudgeJob
KINDS: dict[str, type[AnyJob]] = {"score": ScoreJob, "generate": GenerateJob, "judge": JudgeJob}


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc or 'spec'}: {msg}")
    return "; ".join(lines)


def build_spec(fields: dict) -> AnyJob:
    """Validate a dict of spec fields (from YAML or CLI options) into a job spec of its `kind`."""
    kind = fields.get("kind")
    if kind not in KINDS:
        raise SpecError(f"invalid job spec: kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    return KINDS[kind](**fields)


def load_spec(path: str | Path) -> AnyJob:
    """Read and validate a YAML spec; `{date}` and `{date-N}` anywhere in it become dates (`fill_dates`)."""
    return build_spec(read_spec_fields(path))


def spec_record(spec: AnyJob) -> dict:
    """The spec as written into manifests and reports: JSON-safe and redacted (io/redact.py: URLs' userinfo
    and query values, runtime_env's environment values unless allowed, credential-named fields)."""
    return redact_record(spec.model_dump(mode="json"))
