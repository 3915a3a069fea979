"""CausalLM: the decoder-only model shared by trainer and sampler (one class for llama, qwen3, qwen3_moe)."""

from __future__ import annotations

import dataclasses
from typing import cast

import torch
from torch import nn

from treadle import ops
from treadle.models.blocks import MLP, DecoderLayer, Linear, MoE, RMSNorm
from treadle.models.config import ModelConfig
from treadle.models.hooks import KVCacheHook, LoraHook
from treadle.models.rope import inv_frequencies, rope_cos_sin


@dataclasses.dataclass(frozen=True)
class LoraTarget:
    """A projection an adapter may adapt: its HF module name, shape and which `train_*` switch covers it."""

    key: str
    in_features: int
    out_features: int
    group: str  # "attn" | "mlp" | "unembed"
    # the module's name in the family's transformers model, which PEFT files use (differs for Qwen3-VL)
    hf_name: str = ""

    @property
    def peft_name(self) -> str:
        return self.hf_name or self.key


class _Body(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def causal_mask(T: int, S: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(T, S) bool: query t (the last T of S positions) may attend to keys ≤ its own position."""
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    return torch.arange(S, device=device)[None, :] <= q_pos


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = _Body(cfg)
        self.lm_head = Linear("lm_head", cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", inv_frequencies(cfg), persistent=False)

    def forward(
        self,
        tokens_B_T: torch.Tensor,
        positions_B_T: torch.Tensor | None = None,
        *,
        mask_B_T_S: torch.Tensor | None = None,
        lora: LoraHook | None = None,
        cache: KVCacheHook | None = None,
    ) -> torch.Tensor:
        """Final hidden states `(B, T, D)` (after the last norm). Without a cache and a mask, causal attention."""
        B, T = tokens_B_T.shape
        dev = tokens_B_T.device
        if positions_B_T is None:
            positions_B_T = torch.arange(T, device=dev).expand(B, T)
        if mask_B_T_S is None:
            mask_B_T_S = causal_mask(T, T, dev).expand(B, T, T)
        cos_sin = rope_cos_sin(self.inv_freq, positions_B_T)  # type: ignore[arg-type]
        x = self.model.embed_tokens(tokens_B_T)
        for layer in self.model.layers:
            x = layer(x, cos_sin, mask_B_T_S, lora, cache)
        return self.model.norm(x)

    def logits(self, hidden_B_T_D: torch.Tensor, lora: LoraHook | None = None) -> torch.Tensor:
        """Unembedding in fp32 (log-probabilities are computed from these)."""
        return self.lm_head(hidden_B_T_D, lora).float()

    def logprobs(self, hidden_B_T_D: torch.Tensor, lora: LoraHook | None = None) -> torch.Tensor:
        return ops.current().log_softmax(self.logits(hidden_B_T_D, lora), dim=-1)

    # Where the decoder stack sits in the family's transformers model ("model.language_model." for Qwen3-VL).
    HF_TEXT_PREFIX = "model."

    def lora_targets(self) -> list[LoraTarget]:
        """Every projection LoRA may adapt (the MoE router excepted), with its transformers module name."""
        return [
            dataclasses.replace(t, hf_name=self.HF_TEXT_PREFIX + t.key[len("model.") :])
            if t.key.startswith("model.")
            else t
            for t in self._lora_targets()
        ]

    def _lora_targets(self) -> list[LoraTarget]:
        out: list[LoraTarget] = []
        for layer in cast(list[DecoderLayer], list(self.model.layers)):
            attn = layer.self_attn
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                out.append(LoraTarget(lin.key, lin.in_features, lin.out_features, "attn"))
            mlp = layer.mlp
            if isinstance(mlp, MoE):
                D = self.config.hidden_size
                for e in range(mlp.num_experts):
                    k = f"{mlp.prefix}.experts.{e}"
                    out.append(LoraTarget(f"{k}.gate_proj", D, mlp.inter, "mlp"))
                    out.append(LoraTarget(f"{k}.up_proj", D, mlp.inter, "mlp"))
                    out.append(LoraTarget(f"{k}.down_proj", mlp.inter, D, "mlp"))
            elif isinstance(mlp, MLP):
                for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                    out.append(LoraTarget(lin.key, lin.in_features, lin.out_features, "mlp"))
        out.append(LoraTarget("lm_head", self.config.hidden_size, self.config.vocab_size, "unembed"))
        return out
