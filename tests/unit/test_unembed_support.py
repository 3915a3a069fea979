"""forward_backward unembeds with autograd only where the loss can have a gradient (`losses.gradient_support`).

Two invariants: the support never misses a position whose gradient is non-zero, for every built-in loss and
any log-probs (extreme ones included); and a training pass gives bitwise the results of the plain definition
(full-vocabulary log-softmax of every position, with autograd everywhere): the same log-probs, losses, metrics
and adapter gradients, in the fast and the batch-invariant modes, for a fused batch mixing adapters, losses,
zero and non-zero weights and advantages, and forward-only rows.
"""

from __future__ import annotations

import pytest
import torch

from treadle.engine import losses, trainer
from treadle.engine.engine import Engine
from treadle.engine.types import Datum, ForwardBackwardRequest, LoraConfig


def _rl_inputs(n: int, g: torch.Generator, zero_from: int) -> dict[str, torch.Tensor]:
    adv = torch.randn(n, generator=g)
    adv[zero_from:] = 0
    adv[0] = 0  # a zero advantage among non-zero ones
    return {
        "target_tokens": torch.randint(0, 50, (n,), generator=g),
        "logprobs": -10 * torch.rand(n, generator=g),
        "advantages": adv,
    }


@pytest.mark.parametrize("loss_fn", losses.LOSS_NAMES)
@pytest.mark.parametrize(
    "scale", [1.0, 30.0]
)  # 30: log-probs far from the sampler's, ratios clip or overflow
def test_support_covers_every_position_with_a_gradient(loss_fn, scale):
    g = torch.Generator().manual_seed(7)
    n = 40
    if loss_fn == "cross_entropy":
        w = (torch.rand(n, generator=g) > 0.5).float()
        cases = [{"target_tokens": torch.zeros(n, dtype=torch.long), "weights": w}]
        w2 = torch.zeros(n, 3)
        w2[::3, 1] = 1.0
        cases.append({"target_tokens": torch.zeros(n, 3, dtype=torch.long), "weights": w2})
        cases.append({"target_tokens": torch.zeros(n, dtype=torch.long)})  # no weights: every position
    else:
        cases = [_rl_inputs(n, g, zero_from=n // 2)]
    for inputs in cases:
        shape = inputs["target_tokens"].shape
        lp = (-scale * torch.rand(shape, generator=g)).requires_grad_()
        out = losses.compute(loss_fn, lp, inputs, {})
        (grad,) = torch.autograd.grad(out.loss, lp)
        has_grad = grad != 0 if grad.dim() == 1 else (grad != 0).any(dim=-1)
        support = losses.gradient_support(loss_fn, inputs)
        if support is None:
            continue
        assert support.shape == (n,)
        missed = has_grad & ~support
        assert not bool(missed.any()), f"{loss_fn}: positions {missed.nonzero().flatten().tolist()} missed"
        if loss_fn != "cross_entropy" or "weights" in inputs:
            assert not bool(support.all()), (
                "the support should exclude the zero-weight / zero-advantage positions"
            )


def _requests(seed: int) -> list[ForwardBackwardRequest]:
    g = torch.Generator().manual_seed(seed)

    def ce(n: int) -> Datum:
        tokens = torch.randint(1, 200, (n,), generator=g)
        w = (torch.arange(n) >= n // 2).float()  # a prompt of weight 0, then the completion
        return Datum(tokens, {"target_tokens": torch.roll(tokens, -1), "weights": w})

    def rl(n: int) -> Datum:
        return Datum(torch.randint(1, 200, (n,), generator=g), _rl_inputs(n, g, zero_from=n))

    def rl_prompt(n: int) -> Datum:
        inputs = _rl_inputs(n, g, zero_from=n)
        inputs["advantages"][: n - 5] = (
            0  # advantages on the last five tokens only, as the cookbook builds them
        )
        return Datum(torch.randint(1, 200, (n,), generator=g), inputs)

    return [
        ForwardBackwardRequest("a", [ce(30), ce(17)], "cross_entropy"),
        ForwardBackwardRequest("b", [rl_prompt(40), rl_prompt(25)], "importance_sampling"),
        ForwardBackwardRequest("b", [rl(33)], "ppo"),
        ForwardBackwardRequest("a", [rl_prompt(20)], "dro"),  # support None: every position
        ForwardBackwardRequest("c", [rl_prompt(12)], "cispo"),
        ForwardBackwardRequest("c", [rl_prompt(9)], "gspo"),
        ForwardBackwardRequest("a", [ce(22)], "cross_entropy", forward_only=True),
        ForwardBackwardRequest("b", [Datum(torch.arange(1, 15), _rl_inputs(14, g, zero_from=0))], "ppo"),
    ]


def _dense_target_logprobs(model, bank, mb, requests, row_inputs, hidden_B_T_D, targets_B_T_K, train_ids):
    """The plain definition: every position, padding included, through the full log-softmax with autograd."""
    hook = bank.hook([r.adapter_id for r in mb], train_ids=train_ids)
    return model.logprobs(hidden_B_T_D, hook).gather(-1, targets_B_T_K)


def _no_gradient_anywhere(seed: int) -> list[ForwardBackwardRequest]:
    """A group whose rollouts all got the same reward: every advantage is zero."""
    g = torch.Generator().manual_seed(seed)
    return [
        ForwardBackwardRequest(
            a,
            [Datum(torch.randint(1, 200, (n,), generator=g), _rl_inputs(n, g, zero_from=0))],
            "importance_sampling",
        )
        for a, n in (("a", 19), ("b", 7), ("c", 11))
    ]


def _train(model_dir, deterministic: bool, make) -> tuple[list, dict[str, list[torch.Tensor]]]:
    with Engine(str(model_dir), deterministic=deterministic) as e:
        for i, a in enumerate("abc"):
            e.create_adapter(a, LoraConfig(rank=4, seed=i))
        results = e.forward_backward(make(seed=3))
        grads = {a: [p.grad.clone() for p in e.bank.trainable_parameters(a)] for a in "abc"}
    return results, grads


@pytest.mark.parametrize("make", [_requests, _no_gradient_anywhere])
@pytest.mark.parametrize("deterministic", [False, True])
def test_training_pass_equals_the_dense_definition_bitwise(tiny_model_dir, monkeypatch, deterministic, make):
    sparse, sparse_grads = _train(tiny_model_dir, deterministic, make)
    with monkeypatch.context() as m:
        m.setattr(trainer, "_target_logprobs", _dense_target_logprobs)
        dense, dense_grads = _train(tiny_model_dir, deterministic, make)
    assert len(sparse) == len(dense)
    for s, d in zip(sparse, dense, strict=True):
        assert not isinstance(s, Exception) and not isinstance(d, Exception)
        assert s.metrics == d.metrics
        for so, do in zip(s.loss_fn_outputs, d.loss_fn_outputs, strict=True):
            assert so.keys() == do.keys()
            for k in so:
                assert torch.equal(so[k], do[k]), k
    for a in "abc":
        assert any(bool(g.abs().sum() > 0) for g in dense_grads[a]) == (make is _requests)
        for gs, gd in zip(sparse_grads[a], dense_grads[a], strict=True):
            assert torch.equal(gs, gd)
