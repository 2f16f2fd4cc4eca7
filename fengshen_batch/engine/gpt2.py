"""Our own GPT2 forward over the Hugging Face weights: the one model every job kind runs.

It is built from a checkpoint's config and tensors (`transformer.h.0.attn.c_attn.weight` or, saved from
GPT2Model, `h.0.attn.c_attn.weight`), so a replica loads without transformers' modeling code (seconds of
imports per actor) and straight onto its device. GPT2's layout is kept: Conv1D weights are (in, out), so a
projection is `addmm(bias, x, W)`. All linear layers run on packed tokens (N, d): a prefill of mixed-length
chunks computes no padding. Only attention sees a per-sequence layout: prefill gathers each chunk's blocks
of the paged cache up to its group's span; decode reads each row's blocks in place (`attention.py` on CPU,
`triton_decode.py` on CUDA; gathered for SDPA where Triton is missing).

Three entry points share one block:
- `hidden`: a dense causal pass over right-padded rows (scoring; no cache);
- `prefill`: chunks of several prompts into the engine's paged KV cache (a chunk may start mid-prompt);
- `decode`: one token for each of B sequences, in groups of similar length; with one group its shapes are
  fixed, so it can be graph-captured.
`tests/test_engine.py` checks the logits against `GPT2LMHeadModel`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import MIN_DECODE_ROWS, DecodeKernel, pad_rows
from .kv_cache import BLOCK, KVCache


@dataclass(frozen=True)
class Layer:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    attn_w: torch.Tensor  # (d, 3d)
    attn_b: torch.Tensor  # (3d,)
    proj_w: torch.Tensor  # (d, d)
    proj_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    fc_w: torch.Tensor  # (d, inner)
    fc_b: torch.Tensor
    out_w: torch.Tensor  # (inner, d)
    out_b: torch.Tensor


@dataclass(frozen=True)
class Group:
    """Prefill chunks lo..hi-1, whose tokens are lo_token..hi_token-1 of the packed step, attend together:
    padded to `width` queries each and reading `span` cache positions. Chunks of very different lengths go in
    different groups, so a step of one 400-token prompt and 60 short tails pads none of the tails to 400."""

    lo: int
    hi: int
    lo_token: int
    hi_token: int
    width: int
    span: int


# GPT2 configs' `activation_function`s; gelu_new (GPT2's) is the tanh approximation of GELU.
ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}
# CPU GEMMs (oneDNN/MKL) take other kernels below about a dozen rows, with another summation order: a row's
# result would then depend on how many rows share its step (a decode of 3 sequences vs 8), and so a near-tie
# token on what ran beside it. Linear layers on fewer rows are padded to this many: every row of every step
# gets the same bits on CPU (measured for 1, 2, 4 and 8 threads, up to GPT2-3.5B's shapes).
MIN_ROWS = 16
# ... and past about 176 rows (K=1024, N=256 on 2 cores; 512 for GPT2-3.5B's shapes) they switch kernels again:
# caching on or off, or a bigger step, would move a row's last bits. Larger inputs go through in blocks of
# this many rows, so every row on CPU is computed by the same kernel (about the same speed: 4.8 vs 5.3 ms for
# 2,048 x 1,024 @ 1,024 x 256, 6.2 vs 5.2 ms for 2,048 x 256 @ 256 x 1,024).
MAX_ROWS = 128

_LAYER_KEYS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
               "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
               "mlp.c_proj.weight", "mlp.c_proj.bias")  # fmt: skip


class GPT2:
    """The forward pass of a GPT2 checkpoint's weights (config.json + tensors); any KV cache is the caller's."""

    def __init__(self, config: dict, weights: dict[str, torch.Tensor]):
        """`weights`: the checkpoint's tensors, already on their device and in their dtype, names with or
        without the `transformer.` prefix; `lm_head.weight` may be absent (tied to `wte` in GPT2)."""
        if config.get("model_type") != "gpt2":
            raise ValueError(f"the engine runs GPT2 models, got {config.get('model_type')!r}")
        if config.get("add_cross_attention"):
            raise ValueError("GPT2 with cross-attention is not a causal LM the engine can run")
        act = config.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ValueError(f"GPT2 activation {act!r} is not one of {', '.join(ACTIVATIONS)}")
        w = {k.removeprefix("transformer."): v for k, v in weights.items()}
        try:
            self.wte = w["wte.weight"]  # (V, d)
            self.wpe = w["wpe.weight"]  # (n_positions, d)
            self.lnf_w, self.lnf_b = w["ln_f.weight"], w["ln_f.bias"]
            self.layers = [Layer(*(w[f"h.{i}.{k}"] for k in _LAYER_KEYS)) for i in range(config["n_layer"])]
        except KeyError as e:
            raise ValueError(f"GPT2 checkpoint has no tensor {e.args[0]!r}") from None
        self.lm_head = w.get("lm_head.weight", self.wte)  # (V, d), tied to wte in GPT2
        self.n_head = config["n_head"]
        self.d = config["n_embd"]
        self.head_dim = self.d // self.n_head
        self.eps = config.get("layer_norm_epsilon", 1e-5)
        self.act = ACTIVATIONS[act]
        self.vocab_size = self.lm_head.shape[0]
        self.max_len = config["n_positions"]
        self.dtype = self.wte.dtype
        self.device = self.wte.device
        # CPU decode attention over the paged cache, compiled on first use
        self.decode_attention = DecodeKernel()
        self.scales = []  # attention scale per layer, as HF's GPT2Attention computes it
        for i in range(config["n_layer"]):
            s = self.head_dim**-0.5 if config.get("scale_attn_weights", True) else 1.0
            if config.get("scale_attn_by_inverse_layer_idx", False):
                s /= i + 1
            self.scales.append(s)

    @classmethod
    def from_hf(cls, hf_model) -> GPT2:
        """Over a loaded `GPT2LMHeadModel`'s parameters, in place (tests, and remote-code checkpoints)."""
        return cls(hf_model.config.to_dict(), dict(hf_model.state_dict()))

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    def _ln(self, x, w, b):
        return F.layer_norm(x, (self.d,), w, b, self.eps)

    def _blocks(self, x: torch.Tensor, attend) -> torch.Tensor:
        """x: (N, d) packed tokens; attend(layer index, q, k, v) with q/k/v (N, H, hd) returns (N, d)."""
        H, hd = self.n_head, self.head_dim
        for i, L in enumerate(self.layers):
            qkv = self._linear(self._ln(x, L.ln1_w, L.ln1_b), L.attn_w, L.attn_b)  # (N, 3d)
            q, k, v = qkv.view(-1, 3, H, hd).unbind(1)  # each (N, H, hd)
            x = x + self._linear(attend(i, q, k, v), L.proj_w, L.proj_b)
            h = self.act(self._linear(self._ln(x, L.ln2_w, L.ln2_b), L.fc_w, L.fc_b))  # (N, inner)
            x = x + self._linear(h, L.out_w, L.out_b)
        return x

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, in) @ w (in, out) [+ b], the same bits per row whatever N (see MIN_ROWS and MAX_ROWS)."""
        n = x.shape[0]
        if x.device.type == "cpu":
            if n > MAX_ROWS:  # (N, out) filled block by block, each block a GEMM of at most MAX_ROWS rows
                out = x.new_empty(n, w.shape[1])
                for lo in range(0, n, MAX_ROWS):
                    out[lo : lo + MAX_ROWS] = self._linear(x[lo : lo + MAX_ROWS], w, b)
                return out
            if n < MIN_ROWS:
                x = F.pad(x, (0, 0, 0, MIN_ROWS - n))  # (MIN_ROWS, in): zero rows, dropped below
        out = x @ w if b is None else torch.addmm(b, x, w)
        return out[:n]

    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded rows -> (B, T, d) hidden states before ln_f, causal attention, no cache.

        No padding mask is needed: under the causal mask a real position never sees the padding after it,
        and SDPA can take its fastest (flash) kernel."""
        B, T = input_ids.shape
        H, hd = self.n_head, self.head_dim
        x = (self.wte[input_ids] + self.wpe[:T]).reshape(B * T, self.d)  # (N, d) packed

        def attend(i, q, k, v):
            q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scales[i])
            return out.transpose(1, 2).reshape(B * T, self.d)

        return self._blocks(x, attend).view(B, T, self.d)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d) last hidden states -> (N, V) float32 logits (the LM head after ln_f)."""
        return self._linear(self._ln(x, self.lnf_w, self.lnf_b), self.lm_head.t()).float()

    def prefill(
        self,
        cache: KVCache,
        tokens: torch.Tensor,  # (N,) packed tokens of all chunks
        seq_idx: torch.Tensor,  # (N,) which chunk each token belongs to, 0..B-1
        t_idx: torch.Tensor,  # (N,) its offset inside its chunk
        tables: torch.Tensor,  # (B, nb) block table of each chunk's sequence, padded with the null block
        starts: torch.Tensor,  # (B,) cache position of each chunk's first token (tokens already cached)
        groups: list[Group],  # consecutive chunks that attend together (one group: all of them)
        last: torch.Tensor,  # (G,) packed index of the tokens whose logits are wanted
    ) -> torch.Tensor:
        """Run chunks, write their K/V into the cache, return (G, V) float32 logits at `last`."""
        H, hd = self.n_head, self.head_dim
        dev = tokens.device
        pos = starts[seq_idx] + t_idx  # (N,) absolute positions (the cache index = the position id)
        x = self.wte[tokens] + self.wpe[pos]  # (N, d)
        per_group = []  # (group, its chunks' index within it per token, their block tables, its mask)
        for g in groups:
            local = seq_idx[g.lo_token : g.hi_token] - g.lo  # (Ng,) chunk within the group
            q_pos = starts[g.lo : g.hi, None] + torch.arange(g.width, device=dev)  # (Bg, T)
            # Query t of chunk b sees cache positions <= start_b + t: its prompt so far, causally.
            mask = (torch.arange(g.span, device=dev) <= q_pos[:, :, None])[:, None]  # (Bg, 1, T, S)
            per_group.append((g, local, tables[g.lo : g.hi, : g.span // BLOCK], mask))
        blocks = tables[seq_idx, pos // BLOCK]  # (N,) where each token's K/V goes
        offsets = pos % BLOCK

        def attend(i, q, k, v):
            cache.write(i, blocks, offsets, k, v)  # (N, H, hd)
            out = q.new_empty(q.shape[0], H * hd)  # (N, d)
            for g, local, g_tables, mask in per_group:
                t = t_idx[g.lo_token : g.hi_token]
                qp = q.new_zeros(g.hi - g.lo, g.width, H, hd)
                qp[local, t] = q[g.lo_token : g.hi_token]
                keys, vals = cache.gather(i, g_tables)  # (H, Bg, S, hd)
                o = F.scaled_dot_product_attention(
                    qp.transpose(1, 2),
                    keys.transpose(0, 1),
                    vals.transpose(0, 1),
                    attn_mask=mask,
                    scale=self.scales[i],
                )  # (Bg, H, T, hd)
                out[g.lo_token : g.hi_token] = o.transpose(1, 2)[local, t].reshape(-1, H * hd)
            return out

        x = self._blocks(x, attend)
        return self.logits(x[last])

    def decode(
        self,
        cache: KVCache,
        tokens: torch.Tensor,  # (B,) the token each sequence feeds
        pos: torch.Tensor,  # (B,) its position
        tables: torch.Tensor,  # (B, nb) block tables, padded with the null block
        groups: list[
            tuple[int, int, int]
        ],  # (first row, end row, span): rows attend in groups of similar span
        paged: tuple | None = None,  # Triton: (TritonDecode, starts (B,), tile rows (T, 16), tile lens (T,))
    ) -> torch.Tensor:
        """One token for each of B sequences; attention of the rows lo..hi-1 of a group reads `span` positions
        (a multiple of BLOCK, at most nb * BLOCK), or with `paged` every row its own live positions
        (triton_decode.py; groups ignored). Returns (B, V) float32 logits. With one group, shapes depend only
        on (B, span), so a CUDA graph per bucket replays it (a padding row feeds a null-block position)."""
        B = tokens.shape[0]
        H, hd = self.n_head, self.head_dim
        x = self.wte[tokens] + self.wpe[pos]  # (B, d)
        blocks = tables.gather(1, (pos // BLOCK)[:, None]).squeeze(1)  # (B,) where each new K/V goes
        offsets = pos % BLOCK
        if paged is not None:
            kernel, starts, tile_rows, tile_len = paged
            lens = pos + 1

            def attend_paged(i, q, k, v):
                cache.write(i, blocks, offsets, k, v)  # (B, H, hd)
                o = kernel(
                    q, cache.k[i], cache.v[i], tables, lens, starts, tile_rows, tile_len, self.scales[i]
                )
                return o.reshape(B, H * hd)

            return self.logits(self._blocks(x, attend_paged))
        on_cpu = tokens.device.type == "cpu"
        per_group = []  # CPU: each group's (tables, lengths) padded to MIN_DECODE_ROWS; else its (Bg, 1, 1, S) mask
        for lo, hi, span in groups:
            if on_cpu:
                per_group.append(pad_rows(tables[lo:hi, : span // BLOCK], pos[lo:hi] + 1, MIN_DECODE_ROWS))
            else:
                per_group.append(
                    (torch.arange(span, device=tokens.device) <= pos[lo:hi, None])[:, None, None]
                )

        def attend(i, q, k, v):
            cache.write(i, blocks, offsets, k, v)  # (B, H, hd)
            out = q.new_empty(B, H * hd)
            for (lo, hi, span), extra in zip(groups, per_group, strict=True):
                if on_cpu:  # in place over the blocks (attention.py); padding rows cut off again
                    qg = F.pad(q[lo:hi], (0, 0, 0, 0, 0, extra[0].shape[0] - (hi - lo)))
                    o = self.decode_attention(qg, cache.k[i], cache.v[i], *extra, self.scales[i])[: hi - lo]
                else:
                    keys, vals = cache.gather(i, tables[lo:hi, : span // BLOCK])  # (H, Bg, S, hd)
                    o = F.scaled_dot_product_attention(
                        q[lo:hi, :, None],
                        keys.transpose(0, 1),
                        vals.transpose(0, 1),
                        attn_mask=extra,
                        scale=self.scales[i],
                    )  # (Bg, H, 1, hd)
                out[lo:hi] = o.reshape(hi - lo, H * hd)
            return out

        return self.logits(self._blocks(x, attend))
