"""Our own GPT2 forward over the Hugging Face weights, written for the engine's slot KV cache.

It reads the parameters of the loaded `GPT2LMHeadModel` in place (no copy) and keeps GPT2's layout: Conv1D
weights are (in, out), so a projection is `addmm(bias, x, W)`. All linear layers run on packed tokens
(N, d): a prefill of mixed-length chunks computes no padding. Only attention sees a per-sequence layout, and
it reads the cache up to each step's longest live length, never the whole context.

Two entry points share one block:
- `prefill`: chunks of several prompts (a chunk may start mid-prompt: long prompts are prefilled in parts);
- `decode`: one token for each of the first `B` cache slots; fixed shapes, so it can be graph-captured.
`tests/test_engine.py` checks the logits against `GPT2LMHeadModel`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv_cache import KVCache


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


class GPT2:
    """The forward pass of a GPT2LMHeadModel's weights, with the KV cache owned by the engine."""

    def __init__(self, hf_model):
        from transformers.activations import ACT2FN

        cfg = hf_model.config
        if getattr(cfg, "model_type", None) != "gpt2":
            raise ValueError(f"the engine runs GPT2 models, got {getattr(cfg, 'model_type', None)!r}")
        if getattr(cfg, "add_cross_attention", False):
            raise ValueError("GPT2 with cross-attention is not a causal LM the engine can run")
        t = hf_model.transformer
        self.wte = t.wte.weight  # (V, d)
        self.wpe = t.wpe.weight  # (n_positions, d)
        self.lm_head = hf_model.lm_head.weight  # (V, d), tied to wte in GPT2
        self.lnf_w, self.lnf_b = t.ln_f.weight, t.ln_f.bias
        self.layers = [
            Layer(
                b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias,
                b.attn.c_proj.weight, b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias,
                b.mlp.c_fc.weight, b.mlp.c_fc.bias, b.mlp.c_proj.weight, b.mlp.c_proj.bias,
            )  # fmt: skip
            for b in t.h
        ]
        self.n_head = cfg.n_head
        self.d = cfg.n_embd
        self.head_dim = self.d // self.n_head
        self.eps = cfg.layer_norm_epsilon
        self.act = ACT2FN[cfg.activation_function]
        self.vocab_size = self.lm_head.shape[0]
        self.max_len = cfg.n_positions
        self.dtype = self.wte.dtype
        self.device = self.wte.device
        self.scales = []  # attention scale per layer, as HF's GPT2Attention computes it
        for i in range(cfg.n_layer):
            s = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
            if cfg.scale_attn_by_inverse_layer_idx:
                s /= i + 1
            self.scales.append(s)

    @property
    def n_layer(self) -> int:
        return len(self.layers)

    def _ln(self, x, w, b):
        return F.layer_norm(x, (self.d,), w, b, self.eps)

    def _blocks(self, x: torch.Tensor, attend) -> torch.Tensor:
        """x: (N, d) packed tokens; attend(layer index, q, k, v) with q/k/v (N, H, hd) returns (N, d)."""
        H, hd = self.n_head, self.head_dim
        for i, L in enumerate(self.layers):
            qkv = torch.addmm(L.attn_b, self._ln(x, L.ln1_w, L.ln1_b), L.attn_w)  # (N, 3d)
            q, k, v = qkv.view(-1, 3, H, hd).unbind(1)  # each (N, H, hd)
            x = x + torch.addmm(L.proj_b, attend(i, q, k, v), L.proj_w)
            h = self.act(torch.addmm(L.fc_b, self._ln(x, L.ln2_w, L.ln2_b), L.fc_w))  # (N, inner)
            x = x + torch.addmm(L.out_b, h, L.out_w)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d) last hidden states -> (N, V) float32 logits (the LM head after ln_f)."""
        return (self._ln(x, self.lnf_w, self.lnf_b) @ self.lm_head.t()).float()

    def prefill(
        self,
        cache: KVCache,
        tokens: torch.Tensor,  # (N,) packed tokens of all chunks
        seq_idx: torch.Tensor,  # (N,) which chunk each token belongs to, 0..B-1
        t_idx: torch.Tensor,  # (N,) its offset inside its chunk
        slots: torch.Tensor,  # (B,) cache slot of each chunk
        starts: torch.Tensor,  # (B,) cache position of each chunk's first token (tokens already cached)
        width: int,  # longest chunk
        span: int,  # max over chunks of start + length: how far attention reads the cache
        last: torch.Tensor,  # (G,) packed index of the tokens whose logits are wanted
    ) -> torch.Tensor:
        """Run chunks, write their K/V into the cache, return (G, V) float32 logits at `last`."""
        B = slots.shape[0]
        H, hd = self.n_head, self.head_dim
        pos = starts[seq_idx] + t_idx  # (N,) absolute positions (the cache index = the position id)
        x = self.wte[tokens] + self.wpe[pos]  # (N, d)
        q_pos = starts[:, None] + torch.arange(width, device=tokens.device)  # (B, T)
        # Query t of chunk b sees cache positions <= start_b + t: its prompt so far, causally.
        mask = torch.arange(span, device=tokens.device) <= q_pos[:, :, None]  # (B, T, S)
        mask = mask[:, None]  # (B, 1, T, S)

        def attend(i, q, k, v):
            cache.k[i][slots[seq_idx], :, pos] = k  # (N, H, hd) into (slots, H, M, hd)
            cache.v[i][slots[seq_idx], :, pos] = v
            qp = q.new_zeros(B, width, H, hd)
            qp[seq_idx, t_idx] = q
            keys = cache.k[i][slots, :, :span]  # (B, H, S, hd)
            vals = cache.v[i][slots, :, :span]
            out = F.scaled_dot_product_attention(
                qp.transpose(1, 2), keys, vals, attn_mask=mask, scale=self.scales[i]
            )  # (B, H, T, hd)
            return out.transpose(1, 2)[seq_idx, t_idx].reshape(-1, H * hd)  # (N, d)

        x = self._blocks(x, attend)
        return self.logits(x[last])

    def decode(self, cache: KVCache, tokens: torch.Tensor, pos: torch.Tensor, span: int) -> torch.Tensor:
        """One token for each of the first B slots: tokens, pos (B,). Attention reads positions < span.

        Returns (B, V) float32 logits. Shapes depend only on (B, span), so a CUDA graph per bucket replays it.
        A row without a running sequence is fed the last position (the model runner's scratch), never read.
        """
        B = tokens.shape[0]
        H, hd = self.n_head, self.head_dim
        rows = torch.arange(B, device=tokens.device)
        x = self.wte[tokens] + self.wpe[pos]  # (B, d)
        mask = (torch.arange(span, device=tokens.device) <= pos[:, None])[:, None, None]  # (B, 1, 1, S)

        def attend(i, q, k, v):
            cache.k[i][rows, :, pos] = k  # (B, H, hd)
            cache.v[i][rows, :, pos] = v
            keys, vals = cache.k[i][:B, :, :span], cache.v[i][:B, :, :span]  # (B, H, S, hd): views, no copy
            if q.device.type == "cpu":
                # One query per row: two batched matmuls beat the CPU flash kernel (tiled for long queries)
                # by about 2x at 256 rows.
                att = (q[:, :, None] @ keys.transpose(-1, -2)) * self.scales[i]  # (B, H, 1, S)
                out = att.masked_fill_(~mask, float("-inf")).softmax(-1) @ vals
            else:
                out = F.scaled_dot_product_attention(
                    q[:, :, None], keys, vals, attn_mask=mask, scale=self.scales[i]
                )  # (B, H, 1, hd)
            return out.reshape(B, H * hd)

        return self.logits(self._blocks(x, attend))
