"""Loading safetensors checkpoints into a CausalLM (HF layout; per-expert MoE keys are fused on load)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import safe_open

from treadle.errors import UserError
from treadle.models.causal_lm import CausalLM

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"model path: no *.safetensors files in {directory}", field="model")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open is not a dict
                tensors[k] = sf.get_tensor(k)
    return tensors


def fuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert `experts.{e}.{gate,up,down}_proj.weight` → fused `experts.gate_up_proj` / `experts.down_proj`."""
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        m = _EXPERT.match(k)
        if m:
            groups.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = v
        else:
            out[k] = v
    for prefix, experts in groups.items():
        n = max(experts) + 1
        out[f"{prefix}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]], 0) for e in range(n)]
        )
        out[f"{prefix}.experts.down_proj"] = torch.stack([experts[e]["down_proj"] for e in range(n)])
    return out


def load_state(model: CausalLM, tensors: dict[str, torch.Tensor]) -> None:
    if model.config.vision is not None:
        from treadle.models.qwen3_vl import hf_vl_state

        tensors = hf_vl_state(tensors, model.config)
    state = fuse_experts(tensors)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict().keys())
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(state))
    if missing:
        raise UserError(
            f"model weights: missing tensors {missing[:5]}{'…' if len(missing) > 5 else ''}", field="model"
        )
    extra = set(state) - expected
    for k in extra:
        state.pop(k)
    model.load_state_dict(state, strict=False)
