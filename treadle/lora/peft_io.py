"""Adapter checkpoints in the PEFT layout, plus treadle's optimizer state.

A checkpoint directory holds `adapter_model.safetensors` (keys `base_model.model.<key>.lora_A.weight`
`(r, in)` and `.lora_B.weight` `(out, r)`) and `adapter_config.json`, so `peft.PeftModel.from_pretrained`
loads it; `treadle_adapter.json` keeps what PEFT has no field for (seed, `train_*` switches) and
`optimizer.safetensors` the AdamW moments and step counts when saved with the optimizer. Any PEFT-made
LoRA for a dense model loads back too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from treadle.atomic import atomic_write_dir
from treadle.errors import UserError
from treadle.lora.adapter import AdamState, Adapter, LoraPair
from treadle.lora.config import LoraConfig
from treadle.models.causal_lm import LoraTarget

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
TREADLE_FILE = "treadle_adapter.json"
OPTIMIZER_FILE = "optimizer.safetensors"
FORMAT_VERSION = 1

_PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.default)?\.weight$")


def _peft_key(key: str, which: str) -> str:
    return f"base_model.model.{key}.lora_{which}.weight"


def peft_config(adapter: Adapter, base_model: str) -> dict[str, Any]:
    """The `adapter_config.json` PEFT needs to rebuild the same LoRA on the transformers model."""
    cfg = adapter.config
    # PEFT matches list entries against module-name suffixes; the short names cover every adapted key
    modules = sorted({k.rsplit(".", 1)[-1] for k in adapter.weights})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha if cfg.alpha is not None else 32.0,
        "target_modules": modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _config_dict(cfg: LoraConfig) -> dict[str, Any]:
    return {
        "rank": cfg.rank,
        "seed": cfg.seed,
        "alpha": cfg.alpha,
        "train_attn": cfg.train_attn,
        "train_mlp": cfg.train_mlp,
        "train_unembed": cfg.train_unembed,
    }


def write_adapter(
    adapter: Adapter,
    directory: Path,
    *,
    optimizer: bool,
    base_model: str,
    peft_names: Mapping[str, str] | None = None,
) -> None:
    """Write the checkpoint atomically (replacing an existing one at `directory` as a whole). `peft_names`
    maps treadle's projection keys to the transformers module names PEFT expects (identity when absent)."""
    names = peft_names or {}
    if optimizer and not adapter.trainable:
        raise UserError(
            "optimizer: a frozen sampling snapshot has no optimizer state; save with optimizer=False",
            field="optimizer",
        )
    weights = {}
    for key, pair in adapter.weights.items():
        name = names.get(key, key)
        weights[_peft_key(name, "A")] = pair.a_R_In.detach().to("cpu", copy=True).contiguous()
        weights[_peft_key(name, "B")] = pair.b_Out_R.detach().to("cpu", copy=True).contiguous()
    meta = {
        "format": FORMAT_VERSION,
        "lora_config": _config_dict(adapter.config),
        "base_model": base_model,
        "optimizer": optimizer,
    }
    with atomic_write_dir(Path(directory), overwrite=True) as tmp:
        save_file(weights, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(peft_config(adapter, base_model), indent=2))
        (tmp / TREADLE_FILE).write_text(json.dumps(meta, indent=2))
        if optimizer:
            save_file(_optimizer_tensors(adapter), str(tmp / OPTIMIZER_FILE))


def _optimizer_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, st in adapter.optim.items():
        out[f"{name}.exp_avg"] = st.exp_avg.detach().to("cpu", copy=True).contiguous()
        out[f"{name}.exp_avg_sq"] = st.exp_avg_sq.detach().to("cpu", copy=True).contiguous()
        out[f"{name}.step"] = torch.tensor([st.step], dtype=torch.int64)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint: cannot read {path.name}: {e}", field="path") from e
    if not isinstance(d, dict):
        raise UserError(f"checkpoint: {path.name} must hold a JSON object", field="path")
    return d


def _config_from_peft(d: dict[str, Any], groups_present: set[str]) -> LoraConfig:
    """LoraConfig equivalent to a PEFT config (rejecting PEFT features treadle does not implement)."""
    if d.get("peft_type", "LORA") != "LORA":
        raise UserError(
            f"adapter_config.peft_type: only LORA is supported, got {d.get('peft_type')!r}",
            field="adapter_config.peft_type",
        )
    for name, ok in (
        ("use_dora", not d.get("use_dora")),
        ("bias", d.get("bias", "none") == "none"),
        ("fan_in_fan_out", not d.get("fan_in_fan_out")),
        ("modules_to_save", not d.get("modules_to_save")),
        ("rank_pattern", not d.get("rank_pattern")),
        ("alpha_pattern", not d.get("alpha_pattern")),
    ):
        if not ok:
            raise UserError(
                f"adapter_config.{name}: {d.get(name)!r} is not supported (plain LoRA only)",
                field=f"adapter_config.{name}",
            )
    r = d.get("r")
    if not isinstance(r, int) or r < 1:
        raise UserError(f"adapter_config.r: must be a positive integer, got {r!r}", field="adapter_config.r")
    alpha = float(d.get("lora_alpha", 8))
    if d.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # rsLoRA scales by alpha/sqrt(r); treadle's scale is alpha/r
    return LoraConfig(
        rank=r,
        alpha=alpha,
        train_attn="attn" in groups_present,
        train_mlp="mlp" in groups_present,
        train_unembed="unembed" in groups_present,
    )


def _config_from_treadle(d: dict[str, Any]) -> LoraConfig:
    c = d.get("lora_config")
    if d.get("format") != FORMAT_VERSION or not isinstance(c, dict):
        raise UserError(f"checkpoint: {TREADLE_FILE} has unknown format {d.get('format')!r}", field="path")
    return LoraConfig(**{k: c[k] for k in _config_dict(LoraConfig()) if k in c})


def _read_weights(
    path: Path, targets: dict[str, LoraTarget], device: torch.device | str
) -> dict[str, LoraPair]:
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise UserError(f"checkpoint: cannot read {path.name}: {e}", field="path") from e
    # PEFT files name modules as transformers does; treadle's own key is accepted too
    key_of = {t.peft_name: k for k, t in targets.items()} | {k: k for k in targets}
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = _PEFT_KEY.match(name)
        if m is None:
            raise UserError(f"checkpoint: tensor {name!r} is not a LoRA A/B weight", field="path")
        key = key_of.get(m.group(1), m.group(1))
        if key not in targets:
            raise UserError(
                f"checkpoint: {key!r} is not a projection of this model (wrong base model?)", field="path"
            )
        halves.setdefault(key, {})[m.group(2)] = t
    out: dict[str, LoraPair] = {}
    # in the model's target order (safetensors sorts keys), so parameter order matches a created adapter
    for key in (k for k in targets if k in halves):
        ab = halves[key]
        if set(ab) != {"A", "B"}:
            raise UserError(f"checkpoint: {key!r} needs both lora_A and lora_B", field="path")
        a, b, tgt = ab["A"], ab["B"], targets[key]
        r = a.shape[0]
        if tuple(a.shape) != (r, tgt.in_features) or tuple(b.shape) != (tgt.out_features, r):
            raise UserError(
                f"checkpoint: {key!r} has lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}, this model needs "
                f"(r, {tgt.in_features}) / ({tgt.out_features}, r) (wrong base model?)",
                field="path",
            )
        out[key] = LoraPair(
            a.to(device=device, dtype=torch.float32).requires_grad_(True),
            b.to(device=device, dtype=torch.float32).requires_grad_(True),
        )
    return out


def _read_optimizer(
    path: Path, weights: dict[str, LoraPair], device: torch.device | str
) -> dict[str, AdamState]:
    if not path.exists():
        raise UserError(
            "optimizer: this checkpoint has no optimizer state; load it with optimizer=False",
            field="optimizer",
        )
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise UserError(f"checkpoint: cannot read {path.name}: {e}", field="path") from e
    params = {}
    for key, pair in weights.items():
        params[f"{key}.lora_A"], params[f"{key}.lora_B"] = pair.a_R_In, pair.b_Out_R
    state: dict[str, AdamState] = {}
    for name, p in params.items():
        if f"{name}.step" not in tensors:
            continue  # the parameter never received a gradient before the save
        m, v = tensors.get(f"{name}.exp_avg"), tensors.get(f"{name}.exp_avg_sq")
        if m is None or v is None or m.shape != p.shape or v.shape != p.shape:
            raise UserError(
                f"checkpoint: optimizer state of {name!r} is missing or has the wrong shape", field="path"
            )
        state[name] = AdamState(
            m.to(device=device, dtype=p.dtype),
            v.to(device=device, dtype=p.dtype),
            int(tensors[f"{name}.step"].item()),
        )
    return state


def read_adapter(
    directory: Path,
    targets: Iterable[LoraTarget],
    max_rank: int,
    *,
    optimizer: bool,
    device: torch.device | str = "cpu",
) -> Adapter:
    """Read a treadle- or PEFT-made checkpoint as a trainable adapter of the model with `targets`."""
    directory = Path(directory)
    if not (directory / WEIGHTS_FILE).is_file() or not (directory / CONFIG_FILE).is_file():
        raise UserError(
            f"path: {directory} is not an adapter checkpoint (needs {WEIGHTS_FILE} and {CONFIG_FILE})",
            field="path",
        )
    by_key = {t.key: t for t in targets}
    weights = _read_weights(directory / WEIGHTS_FILE, by_key, device)
    if not weights:
        raise UserError(f"checkpoint: {WEIGHTS_FILE} holds no LoRA tensors", field="path")
    if (directory / TREADLE_FILE).is_file():
        cfg = _config_from_treadle(_read_json(directory / TREADLE_FILE))
    else:
        cfg = _config_from_peft(_read_json(directory / CONFIG_FILE), {by_key[k].group for k in weights})
    cfg.validate(max_rank)
    for key, pair in weights.items():
        if pair.a_R_In.shape[0] != cfg.rank:
            raise UserError(
                f"checkpoint: {key!r} has rank {pair.a_R_In.shape[0]}, the config says {cfg.rank}",
                field="path",
            )
    state = _read_optimizer(directory / OPTIMIZER_FILE, weights, device) if optimizer else {}
    return Adapter(cfg, weights, trainable=True, optim=state)
