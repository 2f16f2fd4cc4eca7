"""The paged KV cache: allocated once per replica as fixed-size blocks that sequences hold through block tables.

Layout: `k`, `v` of shape (layers, heads, blocks, BLOCK, head_dim). A sequence's token at position p lives in
block `table[p // BLOCK]` at offset `p % BLOCK`. Block 0 is the null block: never handed out, it pads block
tables (its positions are masked wherever it is read). Blocks are planned from memory (`plan_blocks`), so the
number of sequences that run at once follows the tokens they hold, not whole contexts: a GPT2-3.5B context is
377 MB in bf16, a block 5.9 MB. The block manager (`block_manager.py`) decides which sequence holds which
blocks, shares prompt blocks by reference (the n samples of a prompt, and cached prefixes) and copies a
shared block before it is written (`copy_blocks`).

Decode attention reads the blocks in place (`attention.py` on CPU, `triton_decode.py` on CUDA). Prefill (and
CUDA decode where Triton is missing) reads a sequence's blocks through `gather`: one indexed copy per layer into (heads, rows, blocks x BLOCK, head_dim),
each (positions, head_dim) matrix contiguous (heads first, so that the copy needs no second permuting one),
whose values do not depend on which blocks hold them. On CPU the copy goes into a workspace kept between
steps: a fresh hundred-megabyte buffer per layer and step costs more in page faults than the copy itself.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

BLOCK = 16  # tokens per block (vLLM's default)
NULL_BLOCK = 0
# Reserve for activations on GPU besides the cache (logits, MLP intermediates), as a fraction.
_ACTIVATION_RESERVE = 0.10


def block_bytes(n_layer: int, d_model: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one block of BLOCK tokens in every layer."""
    return 2 * n_layer * d_model * BLOCK * torch.finfo(dtype).bits // 8


def plan_blocks(
    *,
    n_layer: int,
    d_model: int,
    context: int,
    dtype: torch.dtype,
    device: torch.device,
    max_num_seqs: int | None,
    gpu_memory_utilization: float,
    cpu_kv_cache_gb: float,
) -> tuple[int, int]:
    """(blocks to allocate, the null block included; sequences that may run at once).

    GPU: what fits in `gpu_memory_utilization` of the device's memory once the weights (already loaded) and an
    activation reserve are counted, as vLLM sizes its cache. CPU: `cpu_kv_cache_gb`. At least one full context
    must fit, and no more are allocated than `max_num_seqs` whole contexts. `max_num_seqs` caps the running
    sequences; unset, 256 (vLLM's default)."""
    per_block = block_bytes(n_layer, d_model, dtype)
    if device.type == "cuda":
        _free, total = torch.cuda.mem_get_info(device)
        budget = total * gpu_memory_utilization - torch.cuda.memory_allocated(device)
        budget *= 1 - _ACTIVATION_RESERVE
    else:
        budget = cpu_kv_cache_gb * 2**30
    blocks = int(budget // per_block)
    context_blocks = -(-context // BLOCK)
    if blocks < context_blocks:
        raise MemoryError(
            f"no room for the KV cache of one sequence ({context_blocks * per_block / 2**20:.0f} MiB) on "
            f"{device}: raise " + ("gpu_memory_utilization" if device.type == "cuda" else "cpu_kv_cache_gb")
        )
    seqs = max_num_seqs or 256
    blocks = min(blocks, seqs * context_blocks)  # more than every sequence's whole context is never used
    log.info("KV cache: %d blocks of %d tokens (%d full contexts)", blocks, BLOCK, blocks // context_blocks)
    return blocks + 1, seqs


class KVCache:
    """K and V in `blocks` blocks of BLOCK tokens (block 0: the null block), on one device."""

    def __init__(self, n_layer, blocks, n_head, head_dim, dtype, device):
        shape = (n_layer, n_head, blocks, BLOCK, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.blocks = blocks
        self._work: list[torch.Tensor] = []  # CPU: the gather workspace of K and V, grown as needed

    def write(
        self, layer: int, blocks: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ):
        """K/V of N tokens (N, H, hd) into their blocks and offsets (N,)."""
        slots = blocks * BLOCK + offsets  # (N,) positions in the flattened (H, blocks x BLOCK, hd) layer
        H, hd = k.shape[1:]
        # index_copy_ on the flat view: 20x faster on CPU than index_put_ over (blocks, offsets) pairs
        self.k[layer].view(H, -1, hd).index_copy_(1, slots, k.transpose(0, 1))  # (H, N, hd)
        self.v[layer].view(H, -1, hd).index_copy_(1, slots, v.transpose(0, 1))

    def gather(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The K and V of rows whose block tables are `tables` (B, nb): each (H, B, nb * BLOCK, hd)."""
        B, nb = tables.shape
        H, _, _, hd = self.k.shape[1:]
        shape = (H, B * nb, BLOCK, hd)
        idx = tables.reshape(-1)
        if self.k.device.type != "cpu":
            return tuple(c[layer].index_select(1, idx).view(H, B, nb * BLOCK, hd) for c in (self.k, self.v))
        n = H * B * nb * BLOCK * hd
        if not self._work or self._work[0].numel() < n:
            self._work = [torch.empty(n, dtype=self.k.dtype) for _ in range(2)]
        out = []
        for cache, work in zip((self.k, self.v), self._work, strict=True):
            buf = work[:n].view(shape)
            torch.index_select(cache[layer], 1, idx, out=buf)
            out.append(buf.view(H, B, nb * BLOCK, hd))
        return out[0], out[1]

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Block dst[i] gets block src[i]'s K/V in every layer (copy on write of a shared block)."""
        if src:
            s = torch.tensor(src, device=self.k.device)
            d = torch.tensor(dst, device=self.k.device)
            for cache in (self.k, self.v):
                cache[:, :, d] = cache[:, :, s]

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
