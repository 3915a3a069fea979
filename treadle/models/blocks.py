"""Shared transformer blocks (attention, gated MLP, mixture of experts, decoder layer) over `treadle.ops`.

Parameter names follow the Hugging Face checkpoints so weights load without renaming; every projection
adds the per-row LoRA delta from the `LoraHook` (if any) under its HF module name.
"""

from __future__ import annotations

import torch
from torch import nn

from treadle import ops
from treadle.models.config import ModelConfig
from treadle.models.hooks import KVCacheHook, LoraHook
from treadle.models.rope import apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.current().rmsnorm(x, self.weight, self.eps)


class Linear(nn.Module):
    """A frozen base projection whose output gains the LoRA delta registered under `key`."""

    def __init__(self, key: str, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.key = key
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor, lora: LoraHook | None) -> torch.Tensor:
        y = ops.current().linear(x, self.weight, self.bias)
        if lora is None:
            return y
        add = getattr(lora, "add_delta", None)  # grouped hooks add in place (see LoraHook)
        if add is not None:
            return add(self.key, x, y)
        d = lora.delta(self.key, x)
        return y if d is None else y + d


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        p = f"model.layers.{layer}.self_attn"
        d, h, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        self.layer, self.h, self.hkv, self.d = layer, h, hkv, d
        self.q_proj = Linear(f"{p}.q_proj", cfg.hidden_size, h * d, cfg.attention_bias)
        self.k_proj = Linear(f"{p}.k_proj", cfg.hidden_size, hkv * d, cfg.attention_bias)
        self.v_proj = Linear(f"{p}.v_proj", cfg.hidden_size, hkv * d, cfg.attention_bias)
        self.o_proj = Linear(f"{p}.o_proj", h * d, cfg.hidden_size, cfg.attention_bias)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x_B_T_D: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask_B_T_S: torch.Tensor,
        lora: LoraHook | None,
        cache: KVCacheHook | None,
    ) -> torch.Tensor:
        B, T, _ = x_B_T_D.shape
        q = self.q_proj(x_B_T_D, lora).view(B, T, self.h, self.d)
        k = self.k_proj(x_B_T_D, lora).view(B, T, self.hkv, self.d)
        v = self.v_proj(x_B_T_D, lora).view(B, T, self.hkv, self.d)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        g = self.h // self.hkv
        if g > 1:
            # GQA without copying K/V: the g query heads sharing a kv head become g*T query rows of it
            # (q head i*g + j uses kv head i, as repeat_interleave would); each row still sees its own mask.
            q = q.reshape(B, self.hkv, g * T, self.d)
            mask_B_T_S = mask_B_T_S.repeat(1, g, 1)
        out = ops.current().attention(q, k, v, mask_B_T_S, self.d**-0.5)
        out = out.reshape(B, self.h, T, self.d)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.h * self.d), lora)


class MLP(nn.Module):
    def __init__(self, prefix: str, hidden: int, inter: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(f"{prefix}.gate_proj", hidden, inter, bias)
        self.up_proj = Linear(f"{prefix}.up_proj", hidden, inter, bias)
        self.down_proj = Linear(f"{prefix}.down_proj", inter, hidden, bias)

    def forward(self, x: torch.Tensor, lora: LoraHook | None) -> torch.Tensor:
        return self.down_proj(ops.current().silu(self.gate_proj(x, lora)) * self.up_proj(x, lora), lora)


class Experts(nn.Module):
    """Fused expert weights, named as in transformers ≥ 5 so checkpoints load without renaming."""

    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))


class MoE(nn.Module):
    """Qwen3-MoE sparse block: softmax router, top-k experts, optional renormalisation of the top-k weights.

    Expert weights are stored fused as in transformers ≥ 5 (`gate_up_proj` (E, 2I, D), `down_proj` (E, D, I));
    LoRA keys stay per expert (`…mlp.experts.{e}.gate_proj`) like the original checkpoints.
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.prefix = f"model.layers.{layer}.mlp"
        E, D, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.top_k, self.inter = E, cfg.num_experts_per_tok, inter
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = Linear(f"{self.prefix}.gate", D, E)
        self.experts = Experts(E, D, inter)

    def forward(self, x_B_T_D: torch.Tensor, lora: LoraHook | None) -> torch.Tensor:
        B, T, D = x_B_T_D.shape
        o = ops.current()
        x_N_D = x_B_T_D.reshape(B * T, D)
        rows_N = torch.arange(B, device=x_B_T_D.device).repeat_interleave(T)
        # the router is not adapted (train_mlp adapts the experts, as Tinker does)
        probs_N_E = o.softmax(o.linear(x_N_D, self.gate.weight).float(), dim=-1)
        topw_N_K, topi_N_K = probs_N_E.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            topw_N_K = topw_N_K / topw_N_K.sum(-1, keepdim=True)
        topw_N_K = topw_N_K.to(x_B_T_D.dtype)
        # Each token's contributions are written to its own slot and summed in a fixed order, so a token's
        # output does not depend on which other tokens were routed with it.
        contrib_N_K_D = x_N_D.new_zeros(B * T, self.top_k, D)
        for e in torch.unique(topi_N_K).tolist():
            tok, slot = torch.where(topi_N_K == e)
            xe, re = x_N_D[tok], rows_N[tok]
            gate = o.linear(xe, self.experts.gate_up_proj[e, : self.inter])
            up = o.linear(xe, self.experts.gate_up_proj[e, self.inter :])
            key = f"{self.prefix}.experts.{e}"
            if lora is not None:
                dg, du = lora.delta(f"{key}.gate_proj", xe, re), lora.delta(f"{key}.up_proj", xe, re)
                gate = gate + dg if dg is not None else gate
                up = up + du if du is not None else up
            h = o.silu(gate) * up
            y = o.linear(h, self.experts.down_proj[e])
            if lora is not None:
                dd = lora.delta(f"{key}.down_proj", h, re)
                y = y + dd if dd is not None else y
            contrib_N_K_D = contrib_N_K_D.index_put((tok, slot), y * topw_N_K[tok, slot, None])
        return o.sum(contrib_N_K_D, dim=1).view(B, T, D)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp: nn.Module = (
            MoE(cfg, layer)
            if cfg.is_moe_layer(layer)
            else MLP(f"model.layers.{layer}.mlp", cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos_sin, mask_B_T_S, lora: LoraHook | None, cache: KVCacheHook | None):
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, mask_B_T_S, lora, cache)
        return x + self.mlp(self.post_attention_layernorm(x), lora)
