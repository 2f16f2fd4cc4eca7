"""The KV cache: allocated once per replica, one slot per running sequence.

Layout: `k`, `v` of shape (layers, slots, heads, context, head_dim), written by (slot, position).

Why slots and not pages: a GPT2 context is 1,024 tokens, so a slot wastes at most the unused part of one
context, and a slot is contiguous: torch SDPA (flash / memory-efficient / CPU paths) reads a slot range as a
plain view, the decode step keeps fixed shapes for CUDA graphs, and no gather or paged-attention kernel (a new
heavy dependency) is needed. Decode runs over the first B slots (the scheduler hands out the lowest free slot,
so running sequences stay packed at the front) and reads positions below the batch's longest live length.
The price: the number of slots is sized for whole contexts, fewer sequences than pages would allow when
outputs are short. The n samples of one prompt share its prefill, and prompts share cached prefixes
(`prefix_cache.py`): K/V is copied slot to slot, a whole prefix in one indexed copy per layer stack.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

# Per slot reserve for activations on GPU besides the cache (logits, MLP intermediates), as a fraction.
_ACTIVATION_RESERVE = 0.10


def slot_bytes(n_layer: int, d_model: int, context: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one full-context sequence (377 MB for GPT2-3.5B in bf16)."""
    return 2 * n_layer * d_model * context * torch.finfo(dtype).bits // 8


def plan_slots(
    *,
    n_layer: int,
    d_model: int,
    context: int,
    dtype: torch.dtype,
    device: torch.device,
    max_num_seqs: int | None,
    gpu_memory_utilization: float,
    cpu_kv_cache_gb: float,
) -> int:
    """How many sequence slots to allocate.

    GPU: what fits in `gpu_memory_utilization` of the device's memory once the weights (already loaded) and an
    activation reserve are counted, as vLLM sizes its cache. CPU: `cpu_kv_cache_gb`. `max_num_seqs`, when
    given, caps it; when not given, at most 256 (vLLM's default).
    """
    per_slot = slot_bytes(n_layer, d_model, context, dtype)
    if device.type == "cuda":
        _free, total = torch.cuda.mem_get_info(device)
        budget = total * gpu_memory_utilization - torch.cuda.memory_allocated(device)
        budget *= 1 - _ACTIVATION_RESERVE
    else:
        budget = cpu_kv_cache_gb * 2**30
    fits = int(budget // per_slot)
    if fits < 1:
        raise MemoryError(
            f"no room for the KV cache of one sequence ({per_slot / 2**20:.0f} MiB) on {device}: raise "
            + ("gpu_memory_utilization" if device.type == "cuda" else "cpu_kv_cache_gb")
        )
    want = max_num_seqs or 256
    if want > fits and max_num_seqs:  # a value the user chose that cannot be honoured
        log.warning("max_num_seqs %d does not fit the KV cache budget; using %d", want, fits)
    elif want > fits:  # unset means "what fits": said once, in the log
        log.info("max_num_seqs unset: %d sequences fit the KV cache budget", fits)
    return min(want, fits)


class KVCache:
    """K and V for `slots` sequences of up to `context` tokens, on one device."""

    def __init__(self, n_layer, slots, n_head, context, head_dim, dtype, device):
        shape = (n_layer, slots, n_head, context, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = slots
        self.context = context

    def copy(self, src: int, dst: list[int], start: int, end: int) -> None:
        """Give slots `dst` positions start..end-1 of slot `src`: a prompt's K/V for its other samples, a
        cached prefix for a new prompt, a sequence moved down by compaction."""
        if dst and end > start:
            idx = torch.tensor(dst, device=self.k.device) if len(dst) > 1 else dst[0]
            for cache in (self.k, self.v):
                part = cache[:, src, :, start:end]  # (layers, heads, end - start, head_dim)
                cache[:, idx, :, start:end] = part[:, None] if len(dst) > 1 else part

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
