"""Decode attention over the paged KV cache: each row reads its own blocks where they lie, nothing else.

`paged_decode` is written in plain torch over the block tables (an indexed read of each row's blocks, a
dot product per position, a masked softmax, a weighted sum). On CPU it runs compiled by TorchInductor
(`torch.compile`, dynamic shapes: one compiled kernel for every batch and span), which fuses the indexed read
into the two reductions, so no row's K/V is ever copied: the kernel streams each row's blocks once, and a
block that several rows hold (a shared few-shot header, the n samples of one prompt) is read from the CPU's
own caches after its first row. Measured on 2 cores at 256 rows of 430 positions (4 heads of 64): 23 ms for a
layer with distinct blocks, 7 ms when the rows share a 384-token header, against 47 ms for copying the rows'
blocks out first and 23 ms for the old one-context-per-slot cache reading its slots in place.

Each output element is its own reduction in a fixed order over its row's positions, so a row's bits depend
on its own query and K/V only: not on the rows beside it, the batch's longest span (masked positions add
exact zeros) or which blocks hold its tokens (caching on or off). `tests/test_attention.py` checks this and
checks the values against SDPA over the same K/V gathered into a dense tensor.

Where TorchInductor cannot compile (no C++ compiler on the machine) the same function runs eagerly: the same
values to float rounding, read through a copy. On CUDA decode runs Triton kernels over the block tables, with
cascade tiles for shared prefixes (`triton_decode.py`).
"""

from __future__ import annotations

import logging
import math
import threading

import torch

log = logging.getLogger(__name__)

# Below this many rows TorchInductor would specialise the batch size (a second compile for 1 row): groups are
# padded with rows that read the null block (length 1) up to it.
MIN_DECODE_ROWS = 2


def paged_decode(
    q: torch.Tensor,  # (B, H, hd): one query per row
    k_cache: torch.Tensor,  # (H, blocks, BLOCK, hd): one layer's K, head-major
    v_cache: torch.Tensor,  # (H, blocks, BLOCK, hd)
    tables: torch.Tensor,  # (B, nb) block ids, padded with the null block
    lens: torch.Tensor,  # (B,) live positions of each row (>= 1); positions past it are masked
    scale: float,
) -> torch.Tensor:
    """(B, H, hd) attention output of each row over positions 0..lens-1 of its blocks."""
    H, B, block = k_cache.shape[0], q.shape[0], k_cache.shape[2]
    keys = k_cache[:, tables]  # (H, B, nb, BLOCK, hd), fused into the reduction below when compiled
    scores = (q.transpose(0, 1)[:, :, None, None, :] * keys).sum(-1) * scale  # (H, B, nb, BLOCK)
    scores = scores.reshape(H, B, -1)  # (H, B, S)
    live = torch.arange(scores.shape[-1], device=q.device) < lens[:, None]  # (B, S)
    probs = scores.masked_fill(~live, -math.inf).softmax(-1).view(H, B, -1, block, 1)
    out = (probs * v_cache[:, tables]).sum((2, 3))  # (H, B, hd)
    return out.transpose(0, 1)


class DecodeKernel:
    """`paged_decode` compiled once per process (CPU), or eager where compiling fails.

    Compiling takes seconds once per process (about 4 s on 2 cores with TorchInductor's on-disk cache warm,
    its imports included; twice that cold); the first decode step pays it."""

    def __init__(self):
        self._fn = None
        self._lock = threading.Lock()  # two engine threads in one process compile it once

    def _ensure(self, k_cache, v_cache, scale):
        if self._fn is None:
            with self._lock:
                if self._fn is None:
                    self._fn = self._build(k_cache, v_cache, scale)

    def __call__(self, q, k_cache, v_cache, tables, lens, scale):
        self._ensure(k_cache, v_cache, scale)
        # Contiguous inputs and at least 2 blocks: a stride or a size of 1 that the first compile did not see
        # would make TorchInductor compile again (seconds each, in the middle of a job).
        if tables.shape[1] < 2:
            tables = torch.nn.functional.pad(tables, (0, 2 - tables.shape[1]))  # null blocks, masked
        return self._fn(q.contiguous(), k_cache, v_cache, tables.contiguous(), lens.contiguous(), scale)

    @staticmethod
    def _build(k_cache, v_cache, scale):
        """Compile on a synthetic batch whose row and block counts equal no other size: TorchInductor's duck
        sizing would otherwise tie the batch size to, say, the head count when they first happen to agree,
        and compile again for every batch where they do not."""
        H, blocks, block, hd = k_cache.shape
        rows, nb = [n for n in (7, 11, 13, 17, 19, 23) if n not in (H, blocks, block, hd)][:2]
        g = torch.Generator().manual_seed(0)
        example = (
            torch.randn(rows, H, hd, generator=g).to(k_cache),
            k_cache,
            v_cache,
            torch.randint(0, blocks, (rows, nb), generator=g).to(k_cache.device),
            torch.randint(1, nb * block + 1, (rows,), generator=g).to(k_cache.device),
            scale,
        )
        compiled = torch.compile(paged_decode, dynamic=True)
        try:
            compiled(*example)
        except Exception as e:  # noqa: BLE001 - no compiler, an unsupported build: the eager path is exact too
            log.warning("decode attention runs eagerly (torch.compile failed: %s)", str(e).splitlines()[0])
            return paged_decode
        return compiled


def pad_rows(tables: torch.Tensor, lens: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's (B, nb) tables and (B,) lengths padded to `rows` rows that read one position of the null
    block (their queries are zeros, their outputs dropped)."""
    extra = rows - tables.shape[0]
    if extra <= 0:
        return tables, lens
    return torch.cat([tables, tables.new_zeros(extra, tables.shape[1])]), torch.cat(
        [lens, lens.new_ones(extra)]
    )
