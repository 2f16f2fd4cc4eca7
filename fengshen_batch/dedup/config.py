"""`dedup:` in a generate or score job's spec: near-duplicate samples found by MinHash and LSH, marked in the
data (`dup_cluster`, `dup_keep`) or, with `dedup_output: drop`, moved to `duplicates/`.

The defaults suit short generations: a one-character change in a 30-character Chinese sentence, or a
one-word change in a 25-word English one, keeps a Jaccard of 0.81 and 0.77 over 3-grams, which 128
permutations estimate to +-0.04 (one standard deviation): 0.7 confirms them. 32 bands of 4 rows make a
pair at 0.7 a candidate with probability 1 - (1 - 0.7^4)^32 = 0.9998;
the candidates below the threshold that LSH lets through (its 50% point is (1/32)^(1/4) = 0.42) are
dropped by their signatures' estimated Jaccard.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Dedup(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    near: bool = True  # MinHash near-duplicates (the only mode: exact copies are near-duplicates too)
    threshold: float = Field(default=0.7, gt=0, le=1)  # estimated Jaccard that confirms a candidate pair
    # Shingle length: characters for a text mostly in CJK script (no spaces to split on), words otherwise.
    ngram: int = Field(default=3, ge=1, le=32)
    num_perm: int = Field(default=128, ge=8, le=1024)  # MinHash permutations (a signature's length)
    bands: int = Field(default=32, ge=1, le=256)  # LSH bands of num_perm / bands rows each
    # The survivor of each cluster: the first in input order, the lowest NLL per token, or the longest text.
    keep: Literal["first", "lowest_nll", "longest"] = "first"
    # Earlier outputs with `dedup:` (their signatures/ only): a sample repeating one of theirs is a duplicate.
    against: tuple[str, ...] = ()
    seed: int = 0  # of the permutations: outputs compared with `against` must share it

    @model_validator(mode="after")
    def _bands(self):
        if not self.near:
            raise ValueError("dedup.near: false has nothing to do: exact copies are found as near-duplicates")
        if self.num_perm % self.bands:
            raise ValueError(f"dedup.bands ({self.bands}) must divide dedup.num_perm ({self.num_perm})")
        return self

    def signature_settings(self) -> dict:
        """What makes two outputs' signatures comparable (checked against each `against` output)."""
        from .minhash import ALGORITHM

        return {"ngram": self.ngram, "num_perm": self.num_perm, "seed": self.seed, "algorithm": ALGORITHM}


class DedupOptions(BaseModel):
    """The spec fields of a job kind that can dedup its samples (generate) or its corpus (score)."""

    dedup: Dedup | None = None
    # `mark`: every sample stays in data/ with its dup_cluster and dup_keep; `drop`: data/ keeps the survivors
    # and duplicates/ holds the rest, each sample in exactly one of them.
    dedup_output: Literal["mark", "drop"] = "mark"

    @model_validator(mode="after")
    def _output_needs_dedup(self):
        if self.dedup_output != "mark" and self.dedup is None:
            raise ValueError("dedup_output: drop needs dedup: {near: true, ...}")
        return self
