"""Grouped LoRA (treadle.lora.routing): rows grouped by adapter once per batch, exact per-row results,
per-adapter gradients equal to each adapter's own autograd, and the trainer's mixed-adapter micro-batches."""

from __future__ import annotations

import pytest
import torch

from tests.small_models import load_small, write_small_checkpoint
from treadle import ops
from treadle.engine import trainer
from treadle.engine.types import Datum, ForwardBackwardRequest, LoraConfig
from treadle.lora import AdapterBank
from treadle.lora.routing import GroupedLora, group_rows, lora_delta
from treadle.models import CausalLM


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> CausalLM:
    return load_small(write_small_checkpoint(tmp_path_factory.mktemp("grouped"), "llama"))


def _bank(model: CausalLM, n: int = 3) -> AdapterBank:
    bank = AdapterBank(model)
    for i in range(n):
        # different ranks, scales and targets, so segments really differ
        cfg = LoraConfig(rank=4 + 2 * i, seed=i, alpha=8.0 + i, train_mlp=i != 1, train_unembed=i != 2)
        bank.create(f"a{i}", cfg)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in bank.trainable_parameters(f"a{i}"):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return bank


def _tokens(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def _nll(model: CausalLM, bank: AdapterBank, ids: list[str | None], toks: torch.Tensor) -> torch.Tensor:
    hook = bank.hook(ids)
    lp = model.logprobs(model(toks[:, :-1], lora=hook), hook)
    return -lp.gather(-1, toks[:, 1:, None]).sum()


def test_grouping_is_identity_for_grouped_rows_and_a_permutation_otherwise() -> None:
    ads = [object(), object()]  # only identity matters to group_rows
    g = group_rows([0, 0, 1, -1, -1], ads, torch.device("cpu"))  # type: ignore[arg-type]
    assert g.perm is None and g.inverse is None
    assert [(s.start, s.end) for s in g.segments] == [(0, 2), (2, 3), (3, 5)]
    assert [s.adapter for s in g.segments] == [ads[0], ads[1], None]
    g = group_rows([1, -1, 0, 1, 0], ads, torch.device("cpu"))  # type: ignore[arg-type]
    assert g.perm is not None and g.inverse is not None
    assert g.perm.tolist() == [0, 3, 1, 2, 4]  # first-seen order, stable inside a segment
    assert torch.equal(g.perm[g.inverse], torch.arange(5))
    assert [(s.start, s.end) for s in g.segments] == [(0, 2), (2, 3), (3, 5)]


def test_hook_delta_equals_the_per_row_formula_for_unsorted_decode_batches(model: CausalLM) -> None:
    bank = _bank(model, 3)
    ids: list[str | None] = ["a2", "a0", None, "a1", "a0", "a2", None, "a1"]
    hook = bank.hook(ids)
    assert isinstance(hook, GroupedLora)
    x = torch.randn(len(ids), 1, 64)  # a decode step: one token per row
    for key in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "lm_head"):
        got = hook.delta(key, x)
        assert got is not None
        y = torch.randn_like(got)
        assert torch.equal(hook.add_delta(key, x, y.clone()), y + got)  # the in-place path, bit for bit
        for b, aid in enumerate(ids):
            ad = bank._adapters[aid] if aid is not None else None
            if ad is None or key not in ad.weights:
                assert torch.count_nonzero(got[b]) == 0, (key, b)
            else:
                want = lora_delta(ad.weights[key], ad.scale, x[b : b + 1])[0]
                assert (got[b] - want).abs().max() <= 1e-6, (key, b)


@pytest.mark.parametrize("mode", ["fast", "batch_invariant"])
def test_mixed_unsorted_batch_equals_each_row_alone(model: CausalLM, mode: str) -> None:
    bank = _bank(model, 3)
    ids: list[str | None] = ["a1", "a0", None, "a2", "a0", "a1"]
    toks = _tokens(len(ids), 9)
    with ops.mode(mode):
        hook = bank.hook(ids)
        mixed = model.logits(model(toks, lora=hook), hook)
        for b, aid in enumerate(ids):
            hook1 = bank.hook([aid])
            alone = model.logits(model(toks[b : b + 1], lora=hook1), hook1)[0]
            if mode == "batch_invariant":
                assert torch.equal(mixed[b], alone), b
            else:
                assert (mixed[b] - alone).abs().max() <= 1e-5, b
    base = model.logits(model(toks[:1]))[0]
    assert (mixed[0] - base).abs().max() > 1e-3  # the adapters change the output: not a vacuous check


def test_gradients_equal_each_adapters_own_autograd(model: CausalLM) -> None:
    bank = _bank(model, 3)
    ids: list[str | None] = ["a2", "a0", None, "a1", "a0", "a2"]
    toks = _tokens(len(ids), 8, seed=3)
    _nll(model, bank, ids, toks).backward()
    mixed = {
        a: [p.grad.clone() if p.grad is not None else None for p in bank.trainable_parameters(a)]
        for a in ("a0", "a1", "a2")
    }
    for a in ("a0", "a1", "a2"):
        bank.zero_grad(a)
    for a in ("a0", "a1", "a2"):
        rows = [b for b, i in enumerate(ids) if i == a]
        _nll(model, bank, [a] * len(rows), toks[rows]).backward()
        alone = [p.grad for p in bank.trainable_parameters(a)]
        for gm, ga in zip(mixed[a], alone, strict=True):
            assert gm is not None and ga is not None
            assert torch.allclose(gm, ga, atol=1e-5, rtol=1e-4)
        assert any(float(g.abs().max()) > 0 for g in alone if g is not None)


def _datum(toks: torch.Tensor) -> Datum:
    n = toks.numel() - 1
    return Datum(toks[:-1], {"target_tokens": toks[1:], "weights": torch.ones(n)})


def test_trainer_interleaved_requests_equal_each_request_alone(model: CausalLM) -> None:
    bank = _bank(model, 3)
    toks = _tokens(6, 10, seed=5)
    order = ["a1", "a0", "a2", "a0", "a1", "a2"]  # interleaved: the trainer groups them
    reqs = [ForwardBackwardRequest(a, [_datum(toks[i])], "cross_entropy") for i, a in enumerate(order)]
    kw = dict(vocab_size=128, max_len=64)
    together = trainer.forward_backward(model, bank, reqs, **kw)  # type: ignore[arg-type]
    grads = {
        a: [p.grad.clone() for p in bank.trainable_parameters(a) if p.grad is not None] for a in bank.ids()
    }
    for a in bank.ids():
        bank.zero_grad(a)
    for req, res in zip(reqs, together, strict=True):
        alone = trainer.forward_backward(model, bank, [req], **kw)[0]  # type: ignore[arg-type]
        assert not isinstance(res, Exception) and not isinstance(alone, Exception)
        lp_t, lp_a = res.loss_fn_outputs[0]["logprobs"], alone.loss_fn_outputs[0]["logprobs"]
        assert (lp_t - lp_a).abs().max() <= 1e-5
    for a in bank.ids():
        summed = [p.grad for p in bank.trainable_parameters(a) if p.grad is not None]
        assert len(summed) == len(grads[a]) > 0
        for g1, g2 in zip(grads[a], summed, strict=True):
            assert torch.allclose(g1, g2, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("grouped", [True, False])
def test_hand_written_backward_equals_plain_autograd(grouped: bool) -> None:
    g = torch.Generator().manual_seed(7)
    slots = [0, 0, 1, -1, 2, 2, 2] if grouped else [2, 0, -1, 1, 0, 2, 2]

    class _Ad:  # the three adapters' A/B for one projection, different ranks and scales
        def __init__(self, r: int, scale: float) -> None:
            self.a = torch.randn(r, 12, generator=g).requires_grad_(True)
            self.b = torch.randn(20, r, generator=g).requires_grad_(True)
            self.scale = scale

    ads = [_Ad(3, 2.0), _Ad(5, 0.5), _Ad(2, 1.5)]
    x = torch.randn(len(slots), 4, 12, generator=g).requires_grad_(True)
    w = torch.randn(20, 12, generator=g).requires_grad_(True)
    grad_out = torch.randn(len(slots), 4, 20, generator=g)

    from treadle.lora.adapter import Adapter, LoraPair
    from treadle.lora.routing import grouped_add

    adapters = [
        Adapter(LoraConfig(rank=ad.a.shape[0], alpha=ad.scale * ad.a.shape[0]), {"k": LoraPair(ad.a, ad.b)})
        for ad in ads
    ]
    grouping = group_rows(slots, adapters, torch.device("cpu"))
    assert (grouping.perm is None) == grouped
    out = grouped_add(grouping, "k", x, torch.nn.functional.linear(x, w))
    leaves = [x, w, *(t for ad in ads for t in (ad.a, ad.b))]
    got = torch.autograd.grad(out, leaves, grad_out)

    rows = []
    for b, s in enumerate(slots):  # the plain formula, row by row, through autograd
        yb = torch.nn.functional.linear(x[b], w)
        if s >= 0:
            yb = yb + ads[s].scale * ((x[b] @ ads[s].a.T) @ ads[s].b.T)
        rows.append(yb)
    ref = torch.autograd.grad(torch.stack(rows), leaves, grad_out)
    assert torch.allclose(out, torch.stack(rows), atol=1e-5)
    for a, r in zip(got, ref, strict=True):
        assert torch.allclose(a, r, atol=1e-4, rtol=1e-5)
