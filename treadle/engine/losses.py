"""The built-in Tinker losses (cross_entropy, importance_sampling, ppo, cispo, dro, gspo): validation and math.

Pure functions of one datum's target log-probs and its `loss_fn_inputs`; no model. Every loss is sum-reduced over
tokens (Tinker protocol §5.4; the official docs at tinker-docs.thinkingmachines.ai/tinker/losses), so a batch's
loss is the sum of its datums' losses. Notation: `lp` = learner log-prob of the target token (`target_logprobs`),
`q` = sampler log-prob (`logprobs` input), `A` = `advantages`, `r = exp(lp - q)`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import torch

from treadle.errors import UserError, require

LOSS_NAMES: tuple[str, ...] = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo")

# A deliberate refusal, not a gap: Tinker documents stable_reinforce's inputs (record_stability_info sampling, then
# sequence_id provenance on the training datums) but not its objective, so any formula here would silently train
# something other than what the name promises. The same text refuses record_stability_info, its only consumer.
STABLE_REINFORCE_REFUSAL = (
    "StableReinforce is refused by this server: Tinker has not published its objective (only its inputs), so it "
    "cannot be reproduced faithfully; sample without record_stability_info and train with loss_fn="
    "'importance_sampling', 'ppo', 'cispo' or 'gspo' (the cookbook's loss_fn option)"
)
# Loss names the SDK knows (LossFnType) that are not in the registry, and why.
_UNSUPPORTED_HINTS = {
    "stable_reinforce": f"is not available. {STABLE_REINFORCE_REFUSAL}",
    # the service resolves loss_fn_config's loss_id to the uploaded loss before the engine sees the request
    "custom": "needs a loss uploaded with create_custom_loss and loss_fn_config={'loss_id': …}",
}

_CLIP_DEFAULTS = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}  # Tinker docs: ε = 0.2 by default
_DRO_DEFAULTS = {"beta": 0.05}  # the value the Tinker docs use in their dro example
_RL_INPUTS = ("target_tokens", "logprobs", "advantages")
# The SDK knows both thresholds as per-token loss_fn_inputs too (tinker.types.datum._KEY_TO_TYPE); when sent,
# they override loss_fn_config for that datum.
_CLIP_INPUTS = ("clip_low_threshold", "clip_high_threshold")


@dataclasses.dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable, sum-reduced over this datum
    elementwise_loss: torch.Tensor | None  # detached, same shape as target_tokens; None for a custom loss
    metrics: dict[str, float]  # per-datum, every key "name:reduction"; merged across datums by merge_metrics


_Out = tuple[torch.Tensor, dict[str, float]]  # (elementwise loss with grad, extra metrics)
_LossFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor], Mapping[str, float]], _Out]


_Support = Callable[[Mapping[str, torch.Tensor]], torch.Tensor | None]


@dataclasses.dataclass(frozen=True)
class _Spec:
    required: tuple[str, ...]
    optional: tuple[str, ...]
    defaults: Mapping[str, float]  # the allowed loss_fn_config keys and their defaults
    fn: _LossFn  # (target_logprobs, inputs, config) -> (elementwise loss with grad, extra metrics)
    # (inputs) -> (N,) bool: the positions whose gradient can be non-zero whatever the log-probs are; None = any
    support: _Support


# ---------------------------------------------------------------------------------------------------- the losses


def _cross_entropy(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], _: Mapping[str, float]) -> _Out:
    w = inputs["weights"].to(lp.dtype) if "weights" in inputs else torch.ones_like(lp)
    # where, not a plain product: a zero-weight entry (e.g. an unlisted top-K slot) must contribute exactly
    # nothing, even if its log-prob underflowed to -inf (0 · -inf would be NaN).
    return torch.where(w != 0, -lp * w, torch.zeros_like(lp)), {}


def _importance_sampling(
    lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], _: Mapping[str, float]
) -> _Out:
    q, adv = _rl_inputs(lp, inputs)
    return -torch.exp(lp - q) * adv, {}


def _ppo(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]) -> _Out:
    q, adv = _rl_inputs(lp, inputs)
    return _clipped_surrogate(torch.exp(lp - q), adv, *_thresholds(lp, inputs, config))


def _cispo(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]) -> _Out:
    q, adv = _rl_inputs(lp, inputs)
    low, high = _thresholds(lp, inputs, config)
    ratio = torch.exp(lp - q).detach()
    # CISPO (MiniMax-M1): the clipped ratio is only a stop-gradient coefficient, so every token keeps its
    # log-prob gradient, scaled down where the ratio left the band.
    elementwise = -torch.clamp(ratio, low, high) * lp * adv
    clipped = ((ratio < low) | (ratio > high)) & (adv != 0)
    return elementwise, {"clipped_tokens:sum": float(clipped.sum())}


def _dro(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]) -> _Out:
    q, adv = _rl_inputs(lp, inputs)
    return -(lp * adv - 0.5 * config["beta"] * (lp - q) ** 2), {}


def _gspo(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]) -> _Out:
    q, adv = _rl_inputs(lp, inputs)
    if "sequence_ratio_mask" in inputs:
        in_ratio = inputs["sequence_ratio_mask"] != 0
    else:
        # Prompt positions carry advantage 0 and sampler logprob 0 (cookbook convention), so "nonzero advantage"
        # picks the sampled tokens; had they been included, lp - 0 would drag the ratio far below 1.
        in_ratio = adv != 0
    lp_sg = lp.detach()
    # An empty mask has no sequence ratio; use 1 (log 0) so the loss degrades to the unclipped on-policy one.
    log_ratio = (lp_sg - q)[in_ratio].mean() if bool(in_ratio.any()) else lp_sg.new_zeros(())
    # GSPO-token (Zheng et al. 2025, arXiv:2507.18071): each token carries the sequence ratio's value with the gradient
    # of its own log-prob, so per-token advantages still work.
    ratio = torch.exp(log_ratio + lp - lp_sg)
    return _clipped_surrogate(ratio, adv, *_thresholds(lp, inputs, config))


def _clipped_surrogate(ratio: torch.Tensor, adv: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> _Out:
    """PPO's pessimistic objective min(r·A, clip(r, low, high)·A), negated; also counts the tokens whose
    gradient the clip removed (r above the band with A > 0, or below it with A < 0)."""
    elementwise = -torch.minimum(ratio * adv, torch.clamp(ratio, low, high) * adv)
    r = ratio.detach()
    clipped = ((r > high) & (adv > 0)) | ((r < low) & (adv < 0))
    return elementwise, {"clipped_tokens:sum": float(clipped.sum())}


def _rl_inputs(lp: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return inputs["logprobs"].to(lp.dtype), inputs["advantages"].to(lp.dtype)


def _thresholds(
    lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], config: Mapping[str, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    low, high = (
        inputs[k].to(lp.dtype).reshape(-1).expand_as(lp)
        if k in inputs
        else torch.full_like(lp, config[k], requires_grad=False)
        for k in _CLIP_INPUTS
    )
    return low.detach(), high.detach()


def _weighted(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """cross_entropy's gradient at a position is -weight · d lp: zero wherever every weight is zero."""
    if "weights" not in inputs:
        return None
    w = inputs["weights"] != 0
    return w if w.dim() == 1 else w.any(dim=-1)


def _advantaged(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The policy-gradient losses scale each position's gradient by its advantage (the prompt's is 0)."""
    return inputs["advantages"] != 0


def _anywhere(_: Mapping[str, torch.Tensor]) -> None:
    """dro's quadratic penalty pulls every position whose log-prob differs from the sampler's."""
    return None


_SPECS: dict[str, _Spec] = {
    "cross_entropy": _Spec(("target_tokens",), ("weights",), {}, _cross_entropy, _weighted),
    "importance_sampling": _Spec(_RL_INPUTS, (), {}, _importance_sampling, _advantaged),
    "ppo": _Spec(_RL_INPUTS, _CLIP_INPUTS, _CLIP_DEFAULTS, _ppo, _advantaged),
    "cispo": _Spec(_RL_INPUTS, _CLIP_INPUTS, _CLIP_DEFAULTS, _cispo, _advantaged),
    "dro": _Spec(_RL_INPUTS, (), _DRO_DEFAULTS, _dro, _anywhere),
    "gspo": _Spec(_RL_INPUTS, (*_CLIP_INPUTS, "sequence_ratio_mask"), _CLIP_DEFAULTS, _gspo, _advantaged),
}
assert tuple(_SPECS) == LOSS_NAMES


# ---------------------------------------------------------------------------------------------------- validation


def _spec(loss_fn: str) -> _Spec:
    if loss_fn in _SPECS:
        return _SPECS[loss_fn]
    hint = _UNSUPPORTED_HINTS.get(loss_fn, "is unknown")
    raise UserError(f"loss_fn: {loss_fn!r} {hint}; allowed: {', '.join(LOSS_NAMES)}", field="loss_fn")


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _validate_config(loss_fn: str, spec: _Spec, config: Mapping[str, float]) -> None:
    for key, v in config.items():
        allowed = ", ".join(spec.defaults) or "none"
        require(
            key in spec.defaults, f"loss_fn_config.{key}", f"is not a {loss_fn} option; allowed: {allowed}"
        )
        require(_is_number(v), f"loss_fn_config.{key}", f"must be a finite number, got {v!r}")
    if "beta" in spec.defaults:
        beta = config.get("beta", spec.defaults["beta"])
        require(beta >= 0, "loss_fn_config.beta", f"must be ≥ 0, got {beta!r}")
    if "clip_low_threshold" in spec.defaults:
        low = config.get("clip_low_threshold", spec.defaults["clip_low_threshold"])
        high = config.get("clip_high_threshold", spec.defaults["clip_high_threshold"])
        _check_thresholds(
            torch.tensor([low], dtype=torch.float64),
            torch.tensor([high], dtype=torch.float64),
            "loss_fn_config",
        )


def _check_thresholds(low: torch.Tensor, high: torch.Tensor, where: str) -> None:
    # The thresholds are ratio bounds (0.8/1.2), not ε: a band that excludes ratio 1 would clip on-policy data.
    require(
        bool(((low >= 0) & (low <= 1)).all()),
        f"{where}.clip_low_threshold",
        f"must be a ratio bound in [0, 1] (e.g. 0.8 for ε = 0.2), got {_worst(low, (low < 0) | (low > 1))}",
    )
    require(
        bool((high >= 1).all()),
        f"{where}.clip_high_threshold",
        f"must be a ratio bound ≥ 1 (e.g. 1.2 for ε = 0.2), got {_worst(high, high < 1)}",
    )


def _worst(t: torch.Tensor, bad: torch.Tensor) -> float:
    return float(t[bad][0]) if bool(bad.any()) else float(t.reshape(-1)[0])


def _validate_tensor_shapes(
    loss_fn: str, inputs: Mapping[str, torch.Tensor], n_tokens: int, vocab_size: int
) -> tuple[int, ...]:
    targets = inputs["target_tokens"]
    field = "loss_fn_inputs.target_tokens"
    shape = tuple(targets.shape)
    two_d_ok = loss_fn == "cross_entropy"
    require(
        len(shape) == 1 or (two_d_ok and len(shape) == 2 and shape[1] >= 1),
        field,
        f"must have shape (N,){' or (N, K)' if two_d_ok else ''} with N = model_input length, got {list(shape)}",
    )
    require(shape[0] == n_tokens, field, f"length {shape[0]} must equal the model_input length {n_tokens}")
    if targets.is_floating_point():
        require(bool((targets == targets.round()).all()), field, "must be integer token ids")
    else:
        require(targets.dtype != torch.bool and not targets.is_complex(), field, "must be integer token ids")
    if targets.numel():
        lo, hi = int(targets.min()), int(targets.max())
        require(
            lo >= 0 and hi < vocab_size,
            field,
            f"token ids must be in 0..{vocab_size - 1}, got {lo if lo < 0 else hi}",
        )
    return shape


def validate(
    loss_fn: str, inputs: dict[str, torch.Tensor], config: dict[str, float], n_tokens: int, vocab_size: int
) -> None:
    """Raise a UserError naming the field if this datum's loss inputs or the loss config are unusable."""
    spec = _spec(loss_fn)
    _validate_config(loss_fn, spec, config)
    for key in spec.required:
        require(
            key in inputs,
            f"loss_fn_inputs.{key}",
            f"is required by {loss_fn} (needs {', '.join(spec.required)})",
        )
    allowed = (*spec.required, *spec.optional)
    for key, t in inputs.items():
        require(
            key in allowed,
            f"loss_fn_inputs.{key}",
            f"is not an input of {loss_fn}; allowed: {', '.join(allowed)}",
        )
        require(
            isinstance(t, torch.Tensor) and not t.is_complex() and t.dtype != torch.bool,
            f"loss_fn_inputs.{key}",
            "must be a real-valued numeric tensor",
        )
    target_shape = _validate_tensor_shapes(loss_fn, inputs, n_tokens, vocab_size)
    for key, t in inputs.items():
        if key == "target_tokens":
            continue
        field = f"loss_fn_inputs.{key}"
        if key in _CLIP_INPUTS:
            require(
                tuple(t.shape) == target_shape or t.numel() == 1,
                field,
                f"must have shape {list(target_shape)} (one per token) or be a single value, got {list(t.shape)}",
            )
        else:
            require(
                tuple(t.shape) == target_shape,
                field,
                f"must have the shape of target_tokens {list(target_shape)}, got {list(t.shape)}",
            )
        require(bool(torch.isfinite(t).all()), field, "must contain only finite numbers (no NaN or inf)")
    if "clip_low_threshold" in inputs or "clip_high_threshold" in inputs:
        defaults = {**spec.defaults, **config}
        low, high = (
            inputs[k].double() if k in inputs else torch.tensor([defaults[k]], dtype=torch.float64)
            for k in _CLIP_INPUTS
        )
        _check_thresholds(low, high, "loss_fn_inputs")


# ---------------------------------------------------------------------------------------------------- compute


def gradient_support(loss_fn: str, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """(N,) bool: the positions where this datum's loss can have a non-zero gradient with respect to the target
    log-probs, whatever their values (zero weight or zero advantage: the prompt of an RL datum, the unweighted
    tokens of an SFT one); None when any position can. The trainer backpropagates through the unembedding only
    there, so this must never miss a position that has a gradient (a superset is always safe)."""
    return _spec(loss_fn).support(inputs)


def compute(
    loss_fn: str, target_logprobs: torch.Tensor, inputs: dict[str, torch.Tensor], config: dict[str, float]
) -> LossOutput:
    """One datum's loss. `target_logprobs` has the shape of `target_tokens`; inputs are assumed validated."""
    spec = _spec(loss_fn)
    elementwise, metrics = spec.fn(target_logprobs, inputs, {**spec.defaults, **config})
    loss = elementwise.sum()
    return LossOutput(
        loss=loss,
        elementwise_loss=elementwise.detach(),
        metrics={"loss:sum": float(loss.detach()), **metrics},
    )


_REDUCERS: dict[str, Callable[[list[float]], float]] = {
    "sum": lambda xs: math.fsum(xs),
    "mean": lambda xs: math.fsum(xs) / len(xs),
    "min": min,
    "max": max,
}


def merge_metrics(outputs: list[LossOutput]) -> dict[str, float]:
    """Merge per-datum metrics into one request's metrics, each key by its `:reduction` suffix.

    `loss:sum` is always present (the SDK's forward_backward_custom pops it, §5.5)."""
    values: dict[str, list[float]] = {"loss:sum": []}
    for out in outputs:
        for key, v in out.metrics.items():
            values.setdefault(key, []).append(v)
    return {key: _REDUCERS[key.split(":")[1]](xs) if xs else 0.0 for key, xs in values.items()}
