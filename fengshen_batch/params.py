"""Validated parameters of the two computations (scoring, generation).

They are pydantic models so that a bad value is rejected with a message naming the field and its allowed
range before any model is loaded; the job spec embeds the same fields.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .constraints import Constraint, check

Dtype = Literal["auto", "float32", "float16", "bfloat16"]


class ScoreParams(BaseModel):
    """Perplexity scoring with lm-evaluation-harness `loglikelihood_rolling` semantics."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Tokens newly scored per window after the first. None = the model's context (lm-eval's disjoint windows:
    # every token scored once, the least compute). A smaller stride gives each window at least
    # `n_positions - stride` tokens of context: closer to the true perplexity of long texts, more compute.
    stride: int | None = Field(default=None, ge=1)


class GenerateParams(BaseModel):
    """Batched generation. The sample for (row id, sample_index) depends only on `seed`, the id and the index."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(default=64, ge=1)
    greedy: bool = False
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="0 disables top-k")
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    num_return_sequences: int = Field(default=1, ge=1)
    stop: tuple[str, ...] = ()
    seed: int = 0
    prompt_too_long: Literal["truncate_left", "error"] = "truncate_left"
    ignore_eos: bool = False  # always generate max_new_tokens (fixed-length data; benchmarks)
    # What every output must look like (choice, regex, json_schema or grammar; constraints/spec.py); a job's
    # constraint_column can set one per row instead. Checked here, before any model loads.
    constraint: Constraint | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value):
        if isinstance(value, str):
            value = (value,)
        if any(not isinstance(s, str) or s == "" for s in value or ()):
            raise ValueError("stop strings must be non-empty strings")
        return tuple(value or ())

    @field_validator("constraint")
    @classmethod
    def _compiles(cls, value):
        if value is not None:
            check(value)
        return value

    @model_validator(mode="after")
    def _constraint_ends(self):
        if self.constraint is not None and self.ignore_eos:
            raise ValueError("a constraint ends its output where the constraint is complete: drop ignore_eos")
        return self

    @property
    def sampling(self) -> bool:
        """Greedy when asked, or at temperature 0 (the usual convention)."""
        return not self.greedy and self.temperature > 0


class EngineParams(BaseModel):
    """How the generation engine of one replica is sized (vLLM's knob names where users know them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Sequences decoding at once per replica (fewer while their tokens outgrow the KV cache). None: 256.
    max_num_seqs: int | None = Field(default=None, ge=1)
    # GPU: the fraction of device memory the weights, activations and KV cache may take together.
    gpu_memory_utilization: float = Field(default=0.90, gt=0.0, le=1.0)
    # CPU: GiB of host memory for the KV cache.
    cpu_kv_cache_gb: float = Field(default=2.0, gt=0.0)
    cuda_graphs: bool = True  # capture the decode step per batch-size bucket on CUDA
    # Reuse the K/V of prompt prefixes already in the cache (shared few-shot headers, templates, n > 1):
    # only the rest of a prompt is computed. Outputs are the same either way.
    enable_prefix_caching: bool = True
    # The library behind `constraint` / `constraint_column` (constraints/backend.py).
    constraint_backend: Literal["llguidance"] = "llguidance"
