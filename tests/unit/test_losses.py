"""Tests for treadle.engine.losses: each Tinker loss against an independent per-token reference (value and
gradient), the clipping regions, GSPO's sequence ratio, metric keys, and every validation error."""

from __future__ import annotations

import math

import pytest
import torch

from treadle.engine import losses
from treadle.errors import UserError

# Seven tokens spanning PPO's regions: ratio r = exp(lp - q) below (0.5), inside (≈1.05) and above (1.5) the
# default band [0.8, 1.2], each with a positive and a negative advantage, plus one zero-advantage token.
RATIOS = [0.5, 0.5, 1.05, 1.05, 1.5, 1.5, 1.0]
ADVS = [1.3, -0.7, 1.3, -0.7, 1.3, -0.7, 0.0]
Q = [-1.0, -2.0, -0.3, -1.5, -2.5, -0.9, -1.1]
LP = [q + math.log(r) for q, r in zip(Q, RATIOS, strict=True)]
N = len(LP)
VOCAB = 50
LOW, HIGH = 0.8, 1.2


def _rl_inputs(**extra: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "target_tokens": torch.arange(N) + 3,
        "logprobs": torch.tensor(Q, dtype=torch.float64),  # float64 so the references can be exact
        "advantages": torch.tensor(ADVS, dtype=torch.float64),
        **extra,
    }


def _leaf(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


# ---------------------------------------------------------------- independent references, one token at a time


def _num(x: torch.Tensor | float) -> float:
    return float(x.detach()) if isinstance(x, torch.Tensor) else x


def _ref_per_token(
    loss_fn: str, lp: torch.Tensor, beta: float = 0.05, low: float = LOW, high: float = HIGH
) -> torch.Tensor:
    """Reference loss written token by token with Python control flow; autograd gives its gradient."""
    total = lp.new_zeros(())
    for t in range(N):
        lp_t, q, a = lp[t], Q[t], ADVS[t]
        r = torch.exp(lp_t - q)
        if loss_fn == "importance_sampling":
            total = total - r * a
        elif loss_fn == "ppo":
            # Clip by hand: outside the band the clipped ratio is a constant (no gradient).
            r_clip = low if r.item() < low else high if r.item() > high else r
            total = total - min(r * a, r_clip * a, key=_num)
        elif loss_fn == "cispo":
            coef = min(max(r.item(), low), high)  # a plain float: stop-gradient
            total = total - coef * lp_t * a
        elif loss_fn == "dro":
            total = total - (lp_t * a - 0.5 * beta * (lp_t - q) ** 2)
        else:
            raise AssertionError(loss_fn)
    return total


def _ref_gspo(lp: torch.Tensor, mask: list[bool], low: float = LOW, high: float = HIGH) -> torch.Tensor:
    log_ratios = [lp[t].item() - Q[t] for t in range(N) if mask[t]]
    s = math.exp(sum(log_ratios) / len(log_ratios)) if log_ratios else 1.0
    total = lp.new_zeros(())
    for t in range(N):
        # value s, gradient of the token's own log-prob: s * p_t / sg(p_t)
        s_t = s * torch.exp(lp[t] - lp[t].item())
        s_clip = low if s < low else high if s > high else s_t
        total = total - min(s_t * ADVS[t], s_clip * ADVS[t], key=_num)
    return total


def _value_and_grad(fn, values: list[float]) -> tuple[float, torch.Tensor]:
    lp = _leaf(values)
    loss = fn(lp)
    loss.backward()
    assert lp.grad is not None
    return loss.item(), lp.grad


def _check_against(
    loss_fn: str, ref, inputs: dict[str, torch.Tensor], config: dict[str, float]
) -> losses.LossOutput:
    lp = _leaf(LP)
    out = losses.compute(loss_fn, lp, inputs, config)
    out.loss.backward()
    ref_loss, ref_grad = _value_and_grad(ref, LP)
    assert out.loss.item() == pytest.approx(ref_loss, abs=1e-12)
    assert lp.grad is not None
    torch.testing.assert_close(lp.grad, ref_grad, atol=1e-12, rtol=0)
    assert out.metrics["loss:sum"] == pytest.approx(ref_loss, abs=1e-12)
    return out


# ---------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo", "cispo", "dro"])
def test_token_level_losses_match_reference(loss_fn: str) -> None:
    _check_against(loss_fn, lambda lp: _ref_per_token(loss_fn, lp), _rl_inputs(), {})


def test_dro_beta_from_config() -> None:
    _check_against("dro", lambda lp: _ref_per_token("dro", lp, beta=0.7), _rl_inputs(), {"beta": 0.7})


def test_ppo_clipping_regions() -> None:
    out = _check_against("ppo", lambda lp: _ref_per_token("ppo", lp), _rl_inputs(), {})
    lp = _leaf(LP)
    losses.compute("ppo", lp, _rl_inputs(), {}).loss.backward()
    assert lp.grad is not None
    # The clip removes the gradient exactly where moving further would be rewarded: r < low with A < 0 (token 1)
    # and r > high with A > 0 (token 4). Below the band with A > 0 and above it with A < 0 the unclipped term
    # is the minimum, so the token keeps its full gradient -r·A.
    expected = [-r * a for r, a in zip(RATIOS, ADVS, strict=True)]
    expected[1] = expected[4] = 0.0
    torch.testing.assert_close(lp.grad, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)
    assert out.metrics["clipped_tokens:sum"] == 2.0


def test_cispo_keeps_every_gradient_with_clipped_coefficient() -> None:
    out = _check_against("cispo", lambda lp: _ref_per_token("cispo", lp), _rl_inputs(), {})
    lp = _leaf(LP)
    losses.compute("cispo", lp, _rl_inputs(), {}).loss.backward()
    assert lp.grad is not None
    expected = [-min(max(r, LOW), HIGH) * a for r, a in zip(RATIOS, ADVS, strict=True)]
    torch.testing.assert_close(lp.grad, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)
    assert out.metrics["clipped_tokens:sum"] == 4.0  # the four out-of-band tokens with A ≠ 0


def test_custom_thresholds_change_the_band() -> None:
    # [0.4, 1.6] holds every ratio: nothing is clipped and PPO equals importance sampling.
    config = {"clip_low_threshold": 0.4, "clip_high_threshold": 1.6}
    out = _check_against("ppo", lambda lp: _ref_per_token("ppo", lp, low=0.4, high=1.6), _rl_inputs(), config)
    assert out.metrics["clipped_tokens:sum"] == 0.0
    is_loss = losses.compute("importance_sampling", _leaf(LP), _rl_inputs(), {}).loss
    assert out.loss.item() == pytest.approx(is_loss.item(), abs=1e-12)
    # [0.9, 1.1] also clips the 1.05 tokens' neighbours differently from the default band: check CISPO too.
    narrow = {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}
    _check_against("cispo", lambda lp: _ref_per_token("cispo", lp, low=0.9, high=1.1), _rl_inputs(), narrow)
    _check_against(
        "gspo", lambda lp: _ref_gspo(lp, [a != 0 for a in ADVS], low=0.9, high=1.1), _rl_inputs(), narrow
    )


def test_per_token_threshold_inputs_override_config() -> None:
    lows = torch.tensor([0.8] * N)
    highs = torch.tensor([1.2] * N)
    via_inputs = losses.compute(
        "ppo",
        _leaf(LP),
        _rl_inputs(clip_low_threshold=lows, clip_high_threshold=highs),
        {"clip_low_threshold": 0.1, "clip_high_threshold": 5.0},
    )
    via_config = losses.compute("ppo", _leaf(LP), _rl_inputs(), {})
    assert via_inputs.loss.item() == pytest.approx(via_config.loss.item(), abs=1e-6)
    single = losses.compute("ppo", _leaf(LP), _rl_inputs(clip_high_threshold=torch.tensor([1.2])), {})
    assert single.loss.item() == pytest.approx(via_config.loss.item(), abs=1e-6)


@pytest.mark.parametrize(
    "mask",
    [
        [True] * 4 + [False] * 3,  # sequence ratio 0.5·0.5·1.05·1.05 geometric mean ≈ 0.72: below the band
        [False] * 4 + [True, True, False],  # ≈ 1.5: above the band
        [False, False, True, True, False, False, False],  # ≈ 1.05: inside
        [False] * N,  # empty: ratio 1
    ],
)
def test_gspo_matches_reference(mask: list[bool]) -> None:
    inputs = _rl_inputs(sequence_ratio_mask=torch.tensor(mask, dtype=torch.float32))
    _check_against("gspo", lambda lp: _ref_gspo(lp, mask), inputs, {})


def test_gspo_default_mask_is_nonzero_advantage_tokens() -> None:
    mask = [a != 0 for a in ADVS]
    out = _check_against("gspo", lambda lp: _ref_gspo(lp, mask), _rl_inputs(), {})
    explicit = losses.compute(
        "gspo", _leaf(LP), _rl_inputs(sequence_ratio_mask=torch.tensor(mask).float()), {}
    )
    assert out.loss.item() == explicit.loss.item()


def test_gspo_ignores_sampler_logprobs_outside_the_mask() -> None:
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    base = losses.compute("gspo", _leaf(LP), _rl_inputs(sequence_ratio_mask=mask), {})
    moved = _rl_inputs(sequence_ratio_mask=mask)
    moved["logprobs"] = moved["logprobs"] + (1 - mask) * 3.0
    other = losses.compute("gspo", _leaf(LP), moved, {})
    assert base.loss.item() == other.loss.item()


def test_gspo_clips_whole_sequence() -> None:
    # Sequence ratio above the band: every A > 0 token loses its gradient, every A < 0 token keeps s·(-A).
    mask = [False] * 4 + [True, True, False]
    lp = _leaf(LP)
    out = losses.compute("gspo", lp, _rl_inputs(sequence_ratio_mask=torch.tensor(mask).float()), {})
    out.loss.backward()
    assert lp.grad is not None
    s = 1.5
    expected = [0.0 if a > 0 else -s * a for a in ADVS]
    torch.testing.assert_close(lp.grad, torch.tensor(expected, dtype=torch.float64), atol=1e-9, rtol=0)
    assert out.metrics["clipped_tokens:sum"] == 3.0


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo", "cispo", "gspo"])
def test_on_policy_gradient_is_minus_advantage(loss_fn: str) -> None:
    # With lp == q every ratio is 1, so all policy-gradient losses reduce to REINFORCE: dL/dlp = -A.
    lp = _leaf(Q)
    losses.compute(loss_fn, lp, _rl_inputs(), {}).loss.backward()
    assert lp.grad is not None
    torch.testing.assert_close(lp.grad, -torch.tensor(ADVS, dtype=torch.float64), atol=1e-12, rtol=0)


def test_cross_entropy_1d_matches_reference_and_defaults_weights_to_one() -> None:
    w = [
        1.0,
        0.0,
        0.5,
        2.0,
        0.0,
        1.0,
        -0.3,
    ]  # negative weights: forward_backward_custom sends -dLoss/dlogprobs
    inputs = {"target_tokens": torch.arange(N), "weights": torch.tensor(w, dtype=torch.float64)}
    _check_against(
        "cross_entropy", lambda lp: sum((-lp[t] * w[t] for t in range(N)), lp.new_zeros(())), inputs, {}
    )
    no_weights = losses.compute("cross_entropy", _leaf(LP), {"target_tokens": torch.arange(N)}, {})
    assert no_weights.loss.item() == pytest.approx(-sum(LP), abs=1e-12)


def test_cross_entropy_2d_topk_zero_weights_contribute_nothing() -> None:
    lp_N_K = torch.tensor(
        [[-0.1, -2.0, float("-inf")], [-0.7, -0.9, -3.0]], dtype=torch.float64, requires_grad=True
    )
    w_N_K = torch.tensor([[0.6, 0.4, 0.0], [1.0, 0.0, 0.0]])
    inputs = {"target_tokens": torch.tensor([[4, 5, 0], [6, 0, 0]]), "weights": w_N_K}
    losses.validate("cross_entropy", inputs, {}, 2, VOCAB)
    out = losses.compute("cross_entropy", lp_N_K, inputs, {})
    out.loss.backward()
    ref = sum(
        -lp_N_K[n, k].item() * w_N_K[n, k].item() for n in range(2) for k in range(3) if w_N_K[n, k] != 0
    )
    assert out.loss.item() == pytest.approx(ref, abs=1e-12)
    assert out.elementwise_loss.shape == (2, 3)
    assert lp_N_K.grad is not None
    torch.testing.assert_close(lp_N_K.grad, -w_N_K.double(), atol=0, rtol=0)  # finite, zero where w = 0


@pytest.mark.parametrize("loss_fn", losses.LOSS_NAMES)
def test_output_contract(loss_fn: str) -> None:
    inputs = _rl_inputs() if loss_fn != "cross_entropy" else {"target_tokens": torch.arange(N)}
    lp = torch.tensor(LP, requires_grad=True)  # fp32, as the trainer passes it
    out = losses.compute(loss_fn, lp, inputs, {})
    assert out.loss.shape == () and out.loss.requires_grad
    assert out.elementwise_loss.shape == lp.shape and not out.elementwise_loss.requires_grad
    assert out.loss.item() == pytest.approx(out.elementwise_loss.sum().item(), abs=1e-5)  # sum-reduced
    assert all(k.count(":") == 1 for k in out.metrics)
    with torch.no_grad():  # forward-only requests
        fwd = losses.compute(loss_fn, lp, inputs, {})
    assert fwd.loss.item() == out.loss.item()


def test_merge_metrics_reduces_by_suffix() -> None:
    outs = [
        losses.compute("ppo", _leaf(LP), _rl_inputs(), {}),
        losses.compute("ppo", _leaf(Q), _rl_inputs(), {}),
    ]
    outs[0].metrics["ratio:max"] = 3.0
    outs[1].metrics["ratio:max"] = 5.0
    outs[0].metrics["kl:mean"] = 1.0
    outs[1].metrics["kl:mean"] = 2.0
    merged = losses.merge_metrics(outs)
    assert merged["loss:sum"] == pytest.approx(sum(o.loss.item() for o in outs))
    assert merged["clipped_tokens:sum"] == 2.0
    assert merged["ratio:max"] == 5.0 and merged["kl:mean"] == 1.5
    for key in merged:
        name, suffix = key.split(":")  # the SDK crashes on any key without exactly one colon
        assert name and suffix in {"sum", "mean", "min", "max"}
    assert losses.merge_metrics([]) == {"loss:sum": 0.0}


# ---------------------------------------------------------------- validation


def test_valid_inputs_pass() -> None:
    for loss_fn in losses.LOSS_NAMES:
        inputs = (
            _rl_inputs()
            if loss_fn != "cross_entropy"
            else {"target_tokens": torch.arange(N), "weights": torch.ones(N)}
        )
        losses.validate(loss_fn, inputs, {}, N, VOCAB)
    losses.validate("ppo", _rl_inputs(), {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}, N, VOCAB)
    losses.validate(
        "gspo", _rl_inputs(sequence_ratio_mask=torch.ones(N)), {"clip_high_threshold": 1.3}, N, VOCAB
    )
    losses.validate("dro", _rl_inputs(), {"beta": 0.0}, N, VOCAB)
    whole_floats = {"target_tokens": torch.arange(N).float(), "weights": torch.ones(N)}
    losses.validate("cross_entropy", whole_floats, {}, N, VOCAB)


def _with(base: dict[str, torch.Tensor], **changes: torch.Tensor | None) -> dict[str, torch.Tensor]:
    out = dict(base)
    for k, v in changes.items():
        if v is None:
            out.pop(k)
        else:
            out[k] = v
    return out


CE = {"target_tokens": torch.arange(N), "weights": torch.ones(N)}
RL = _rl_inputs()
BAD = [
    # (loss_fn, inputs, config, field, words the message must contain)
    ("sft", CE, {}, "loss_fn", ["cross_entropy, importance_sampling, ppo, cispo, dro, gspo"]),
    ("stable_reinforce", RL, {}, "loss_fn", ["importance_sampling"]),
    ("cross_entropy", CE, {"beta": 0.1}, "loss_fn_config.beta", ["allowed: none"]),
    (
        "ppo",
        RL,
        {"clip_ratio": 0.2},
        "loss_fn_config.clip_ratio",
        ["clip_low_threshold, clip_high_threshold"],
    ),
    ("dro", RL, {"clip_low_threshold": 0.8}, "loss_fn_config.clip_low_threshold", ["allowed: beta"]),
    ("ppo", RL, {"clip_low_threshold": float("nan")}, "loss_fn_config.clip_low_threshold", ["finite"]),
    ("ppo", RL, {"clip_low_threshold": 1.5}, "loss_fn_config.clip_low_threshold", ["[0, 1]"]),
    ("cispo", RL, {"clip_low_threshold": -0.1}, "loss_fn_config.clip_low_threshold", ["[0, 1]"]),
    ("gspo", RL, {"clip_high_threshold": 0.2}, "loss_fn_config.clip_high_threshold", ["≥ 1"]),
    ("dro", RL, {"beta": -1.0}, "loss_fn_config.beta", ["≥ 0"]),
    ("dro", RL, {"beta": float("inf")}, "loss_fn_config.beta", ["finite"]),
    ("cross_entropy", _with(CE, target_tokens=None), {}, "loss_fn_inputs.target_tokens", ["required"]),
    ("ppo", _with(RL, logprobs=None), {}, "loss_fn_inputs.logprobs", ["required"]),
    ("importance_sampling", _with(RL, advantages=None), {}, "loss_fn_inputs.advantages", ["required"]),
    ("importance_sampling", _with(RL, mask=torch.ones(N)), {}, "loss_fn_inputs.mask", ["allowed"]),
    ("ppo", _with(RL, weights=torch.ones(N)), {}, "loss_fn_inputs.weights", ["allowed"]),
    (
        "ppo",
        _with(RL, sequence_ratio_mask=torch.ones(N)),
        {},
        "loss_fn_inputs.sequence_ratio_mask",
        ["allowed"],
    ),
    (
        "cross_entropy",
        _with(CE, target_tokens=torch.arange(N - 1)),
        {},
        "loss_fn_inputs.target_tokens",
        [str(N)],
    ),
    (
        "ppo",
        _with(RL, target_tokens=torch.zeros(N, 2, dtype=torch.long)),
        {},
        "loss_fn_inputs.target_tokens",
        ["(N,)"],
    ),
    (
        "cross_entropy",
        _with(CE, target_tokens=torch.zeros(N, 2, 2, dtype=torch.long)),
        {},
        "loss_fn_inputs.target_tokens",
        ["(N, K)"],
    ),
    (
        "cross_entropy",
        _with(CE, target_tokens=torch.zeros(N, 0, dtype=torch.long)),
        {},
        "loss_fn_inputs.target_tokens",
        ["(N, K)"],
    ),
    ("cross_entropy", _with(CE, weights=torch.ones(N + 1)), {}, "loss_fn_inputs.weights", ["shape"]),
    (
        "cross_entropy",
        {"target_tokens": torch.zeros(N, 2, dtype=torch.long), "weights": torch.ones(N)},
        {},
        "loss_fn_inputs.weights",
        ["shape"],
    ),
    ("dro", _with(RL, advantages=torch.ones(N, 1)), {}, "loss_fn_inputs.advantages", ["shape"]),
    (
        "cross_entropy",
        _with(CE, target_tokens=torch.arange(N) + VOCAB - 2),
        {},
        "loss_fn_inputs.target_tokens",
        [f"0..{VOCAB - 1}"],
    ),
    ("ppo", _with(RL, target_tokens=torch.arange(N) - 1), {}, "loss_fn_inputs.target_tokens", ["-1"]),
    (
        "cross_entropy",
        _with(CE, target_tokens=torch.arange(N) + 0.5),
        {},
        "loss_fn_inputs.target_tokens",
        ["integer"],
    ),
    (
        "cross_entropy",
        _with(CE, weights=torch.tensor([1.0] * (N - 1) + [float("nan")])),
        {},
        "loss_fn_inputs.weights",
        ["finite"],
    ),
    (
        "ppo",
        _with(RL, advantages=torch.tensor([0.0] * (N - 1) + [float("inf")])),
        {},
        "loss_fn_inputs.advantages",
        ["finite"],
    ),
    (
        "gspo",
        _with(RL, logprobs=torch.tensor([float("-inf")] + [0.0] * (N - 1))),
        {},
        "loss_fn_inputs.logprobs",
        ["finite"],
    ),
    ("ppo", _with(RL, clip_low_threshold=torch.ones(2)), {}, "loss_fn_inputs.clip_low_threshold", ["shape"]),
    (
        "ppo",
        _with(RL, clip_high_threshold=torch.full((N,), 0.9)),
        {},
        "loss_fn_inputs.clip_high_threshold",
        ["≥ 1"],
    ),
    (
        "ppo",
        _with(RL, clip_low_threshold=torch.tensor([1.1])),
        {},
        "loss_fn_inputs.clip_low_threshold",
        ["[0, 1]"],
    ),
]


@pytest.mark.parametrize(("loss_fn", "inputs", "config", "field", "words"), BAD, ids=[b[3] for b in BAD])
def test_validation_errors_name_the_field(
    loss_fn: str, inputs: dict[str, torch.Tensor], config: dict[str, float], field: str, words: list[str]
) -> None:
    with pytest.raises(UserError) as info:
        losses.validate(loss_fn, inputs, config, N, VOCAB)
    assert info.value.field == field
    assert field in info.value.message
    for w in words:
        assert w in info.value.message


def test_compute_rejects_unknown_loss() -> None:
    with pytest.raises(UserError) as info:
        losses.compute("nope", _leaf(LP), _rl_inputs(), {})
    assert info.value.field == "loss_fn"
