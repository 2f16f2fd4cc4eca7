"""One model replica on one device: what the engine, scoring and judging compute with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a type only: importing this module imports no torch
    import torch

    from .gpt2 import GPT2


@dataclass
class Replica:
    """One model replica on one device, with what the engine needs to know about it."""

    model: GPT2  # our forward over the checkpoint's weights
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    max_length: int  # context window: n_positions (1024 for the 3.5B models)
    eos_id: int
    source: str

    def encode(self, text: str) -> list[int]:
        """Token ids without special tokens added (lm-eval's `tok_encode` for GPT2)."""
        return self.tokenizer.encode(text, add_special_tokens=False)
