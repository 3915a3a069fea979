"""treadle.lora on tiny random-init llama / qwen3_moe checkpoints: routing, gradients, AdamW, isolation, I/O."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.small_models import load_small, write_small_checkpoint
from treadle import ops
from treadle.atomic import atomic_write_dir
from treadle.engine.types import AdamParams, LoraConfig
from treadle.errors import ConflictError, NotFoundError, UserError
from treadle.lora import AdapterBank
from treadle.models import CausalLM


def tiny_checkpoint(tmp: Path, family: str = "llama") -> Path:
    moe: dict[str, Any] = (
        dict(head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
        if family == "qwen3_moe"
        else {}
    )
    return write_small_checkpoint(tmp, family, **moe)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "llama")


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "qwen3_moe")


@pytest.fixture
def model(llama_dir: Path) -> CausalLM:
    return load_small(llama_dir)


def tokens(B: int = 3, T: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def logits_for(model: CausalLM, bank: AdapterBank, ids: list[str | None], toks: torch.Tensor) -> torch.Tensor:
    hook = bank.hook(ids)
    return model.logits(model(toks, lora=hook), hook)


def perturb(bank: AdapterBank, adapter_id: str, seed: int) -> None:
    """Give B non-zero values so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bank.trainable_parameters(adapter_id):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def nll(model: CausalLM, bank: AdapterBank, ids: list[str | None], toks: torch.Tensor) -> torch.Tensor:
    hook = bank.hook(ids)
    lp = model.logprobs(model(toks[:, :-1], lora=hook), hook)
    return -lp.gather(-1, toks[:, 1:, None]).sum()


def snapshot(bank: AdapterBank, adapter_id: str) -> dict[str, torch.Tensor]:
    ad = bank._adapters[adapter_id]
    out = {n: p.detach().clone() for n, p in ad.named_parameters()}
    for n, st in ad.optim.items():
        out[f"{n}.m"], out[f"{n}.v"] = st.exp_avg.clone(), st.exp_avg_sq.clone()
        out[f"{n}.step"] = torch.tensor(st.step)
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_new_adapter_reproduces_base_exactly(model: CausalLM) -> None:
    bank = AdapterBank(model)
    bank.create("a", LoraConfig(rank=8, seed=3))
    toks = tokens()
    base = model.logits(model(toks))
    assert torch.equal(logits_for(model, bank, ["a", "a", "a"], toks), base)


def test_same_seed_same_init_and_targets_follow_switches(model: CausalLM) -> None:
    bank = AdapterBank(model)
    bank.create("a", LoraConfig(rank=4, seed=7))
    bank.create("b", LoraConfig(rank=4, seed=7))
    bank.create("c", LoraConfig(rank=4, seed=8, train_attn=False, train_unembed=False))
    for pa, pb in zip(bank.trainable_parameters("a"), bank.trainable_parameters("b"), strict=True):
        assert torch.equal(pa, pb) and pa.data_ptr() != pb.data_ptr()
    keys_c = set(bank._adapters["c"].weights)
    assert keys_c == {t.key for t in model.lora_targets() if t.group == "mlp"}
    assert not torch.equal(bank.trainable_parameters("a")[0], bank.trainable_parameters("c")[0])


def test_errors_are_typed(model: CausalLM) -> None:
    bank = AdapterBank(model, max_rank=16)
    with pytest.raises(UserError, match="rank"):
        bank.create("a", LoraConfig(rank=32))
    bank.create("a", LoraConfig(rank=4))
    with pytest.raises(UserError, match="already exists"):
        bank.create("a", LoraConfig(rank=4))
    for call in (
        lambda: bank.config("x"),
        lambda: bank.hook(["a", "x"]),
        lambda: bank.remove("x"),
        lambda: bank.optim_step("x", AdamParams()),
        lambda: bank.copy("x", "y"),
    ):
        with pytest.raises(NotFoundError, match="adapter_id"):
            call()
    assert bank.hook([None, None]) is None
    assert "a" in bank and "x" not in bank and bank.ids() == ["a"]


def test_per_row_routing_equals_each_row_alone(model: CausalLM) -> None:
    bank = AdapterBank(model)
    bank.create("a", LoraConfig(rank=8, seed=1))
    bank.create("b", LoraConfig(rank=4, seed=2, alpha=16, train_mlp=False))
    perturb(bank, "a", 10)
    perturb(bank, "b", 11)
    toks = tokens(B=4)
    ids: list[str | None] = ["a", None, "b", "a"]
    mixed = logits_for(model, bank, ids, toks)
    for b, aid in enumerate(ids):
        alone = logits_for(model, bank, [aid], toks[b : b + 1])
        assert (mixed[b] - alone[0]).abs().max() <= 1e-6
    # the adapters really change the output, so the comparison above is not vacuous
    assert (mixed[0] - mixed[1]).abs().max() > 1e-3 and (mixed[2] - mixed[1]).abs().max() > 1e-3


def test_gradients_accumulate_and_stay_per_adapter(model: CausalLM) -> None:
    bank = AdapterBank(model)
    bank.create("a", LoraConfig(rank=4, seed=1))
    bank.create("b", LoraConfig(rank=4, seed=2))
    perturb(bank, "a", 3)
    toks = tokens(B=2, T=6)
    nll(model, bank, ["a", "a"], toks).backward()
    union = [p.grad.clone() for p in bank.trainable_parameters("a") if p.grad is not None]
    assert not bank.has_grad("b")
    bank.zero_grad("a")
    assert not bank.has_grad("a")
    nll(model, bank, ["a", None], toks[:1].expand(2, -1)).backward()
    nll(model, bank, ["b", "a"], torch.stack([toks[0], toks[1]])).backward()
    split = [p.grad for p in bank.trainable_parameters("a") if p.grad is not None]
    assert len(split) == len(union)
    for g1, g2 in zip(union, split, strict=True):
        assert torch.allclose(g1, g2, atol=1e-6, rtol=1e-5)
    assert bank.has_grad("b")


def _torch_reference_step(params: list[torch.Tensor], grads: list[torch.Tensor], hp: AdamParams, steps: int):
    ref = [p.detach().clone().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(
        ref,
        lr=hp.learning_rate,
        betas=(hp.beta1, hp.beta2),
        eps=hp.eps,
        weight_decay=hp.weight_decay,
        foreach=False,
    )
    for _ in range(steps):
        for r, g in zip(ref, grads, strict=True):
            r.grad = g.clone()
        if hp.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(ref, hp.grad_clip_norm)
        opt.step()
    return ref


@pytest.mark.parametrize(
    "hp",
    [
        AdamParams(learning_rate=1e-2),
        AdamParams(learning_rate=1e-2, weight_decay=0.1, grad_clip_norm=0.05, beta2=0.999, eps=1e-8),
    ],
)
def test_adamw_matches_torch(model: CausalLM, hp: AdamParams) -> None:
    bank = AdapterBank(model)
    bank.create("a", LoraConfig(rank=4, seed=1))
    perturb(bank, "a", 5)
    params = bank.trainable_parameters("a")
    g = torch.Generator().manual_seed(9)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    ref = _torch_reference_step(params, grads, hp, steps=2)
    for _ in range(2):
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr.clone()
        metrics = bank.optim_step("a", hp)
        assert not bank.has_grad("a")
    for p, r in zip(params, ref, strict=True):
        assert torch.allclose(p, r, atol=1e-7, rtol=1e-6)
    expected_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))
    assert metrics["grad_norm:mean"] == pytest.approx(float(expected_norm), rel=1e-5)
    assert all(k.count(":") == 1 for k in metrics)


def test_optim_step_without_grad_is_a_noop(model: CausalLM) -> None:
    bank = AdapterBank(model)
    bank.create("a", LoraConfig(rank=4, seed=1))
    before = snapshot(bank, "a")
    metrics = bank.optim_step("a", AdamParams(learning_rate=0.1, weight_decay=0.5))
    assert metrics["grad_norm:mean"] == 0.0 and metrics["lr:mean"] == 0.1
    assert_same(before, snapshot(bank, "a"))


def train_step(
    model: CausalLM, bank: AdapterBank, adapter_id: str, seed: int, hp: AdamParams
) -> dict[str, float]:
    nll(model, bank, [adapter_id, adapter_id], tokens(B=2, T=6, seed=seed)).backward()
    return bank.optim_step(adapter_id, hp)


HP = AdamParams(learning_rate=1e-2, weight_decay=0.01, grad_clip_norm=1.0)


def test_isolation_every_op_on_a_leaves_b_bit_identical(model: CausalLM, tmp_path: Path) -> None:
    bank = AdapterBank(model)
    bank.create("b", LoraConfig(rank=4, seed=2))
    train_step(model, bank, "b", 1, HP)
    b0 = snapshot(bank, "b")

    def check() -> None:
        assert_same(b0, snapshot(bank, "b"))
        assert not bank.has_grad("b")

    bank.create("a", LoraConfig(rank=8, seed=2))
    check()
    nll(model, bank, ["a", "a"], tokens(B=2, T=6, seed=3)).backward()
    check()
    # b's rows are forward-only in this batch: train_ids keeps backward out of b's tensors
    hook = bank.hook(["a", "b"], train_ids={"a"})
    toks = tokens(B=2, T=6, seed=4)
    lp = model.logprobs(model(toks, lora=hook), hook)
    lp[:, :-1].gather(-1, toks[:, 1:, None]).sum().backward()
    check()
    bank.optim_step("a", HP)
    check()
    bank.save("a", tmp_path / "a", optimizer=True, base_model="tiny")
    check()
    bank.load("a2", tmp_path / "a", optimizer=True)
    check()
    bank.copy("a", "a_snap")
    bank.remove("a")
    check()
    assert sorted(bank.ids()) == ["a2", "a_snap", "b"]


def test_mixed_batch_without_train_ids_routes_grads_to_every_adapter(model: CausalLM) -> None:
    bank = AdapterBank(model)
    bank.create("a", LoraConfig(rank=4, seed=1))
    bank.create("b", LoraConfig(rank=4, seed=2))
    nll(model, bank, ["a", "b"], tokens(B=2, T=6)).backward()
    assert bank.has_grad("a") and bank.has_grad("b")


def test_copy_is_a_frozen_snapshot(model: CausalLM) -> None:
    bank = AdapterBank(model)
    bank.create("a", LoraConfig(rank=4, seed=1))
    train_step(model, bank, "a", 1, HP)
    bank.copy("a", "snap")
    toks = tokens()
    before = logits_for(model, bank, ["a"] * 3, toks)
    train_step(model, bank, "a", 2, HP)
    assert torch.equal(logits_for(model, bank, ["snap"] * 3, toks), before)
    assert not torch.equal(logits_for(model, bank, ["a"] * 3, toks), before)
    assert bank.trainable_parameters("snap") == []
    with pytest.raises(UserError, match="frozen"):
        bank.optim_step("snap", HP)
    with pytest.raises(UserError, match="already exists"):
        bank.copy("a", "snap")


def test_save_load_round_trip_continues_identically(model: CausalLM, tmp_path: Path) -> None:
    bank = AdapterBank(model)
    cfg = LoraConfig(rank=4, seed=5, alpha=8.0, train_unembed=False)
    bank.create("a", cfg)
    for s in range(2):
        train_step(model, bank, "a", s, HP)
    bank.save("a", tmp_path / "ck", optimizer=True, base_model="tiny")
    assert bank.load("b", tmp_path / "ck", optimizer=True) == cfg
    assert_same(snapshot(bank, "a"), snapshot(bank, "b"))
    ma, mb = train_step(model, bank, "a", 7, HP), train_step(model, bank, "b", 7, HP)
    assert ma == mb
    assert_same(snapshot(bank, "a"), snapshot(bank, "b"))
    # weights only: the same weights, fresh optimizer state
    bank.save("a", tmp_path / "w", optimizer=False, base_model="tiny")
    bank.load("c", tmp_path / "w", optimizer=False)
    assert bank._adapters["c"].optim == {}
    for pa, pc in zip(bank.trainable_parameters("a"), bank.trainable_parameters("c"), strict=True):
        assert torch.equal(pa, pc)
    with pytest.raises(UserError, match="optimizer"):
        bank.load("d", tmp_path / "w", optimizer=True)
    assert "d" not in bank


def test_load_rejects_checkpoints_that_do_not_fit(model: CausalLM, moe_dir: Path, tmp_path: Path) -> None:
    bank = AdapterBank(model)
    bank.create("a", LoraConfig(rank=8, seed=1))
    bank.save("a", tmp_path / "a", optimizer=False, base_model="tiny")
    with pytest.raises(UserError, match="rank"):
        AdapterBank(model, max_rank=4).load("a", tmp_path / "a", optimizer=False)
    with pytest.raises(UserError, match="wrong base model"):
        AdapterBank(load_small(moe_dir)).load("a", tmp_path / "a", optimizer=False)
    with pytest.raises(UserError, match="not an adapter checkpoint"):
        bank.load("b", tmp_path / "missing", optimizer=False)
    assert bank.ids() == ["a"]


def test_atomic_write_dir(tmp_path: Path) -> None:
    final = tmp_path / "ck"
    with pytest.raises(RuntimeError), atomic_write_dir(final) as tmp:
        (tmp / "x").write_text("half")
        raise RuntimeError("crash while writing")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_write_dir(final) as tmp:
        (tmp / "x").write_text("one")
    with pytest.raises(ConflictError), atomic_write_dir(final):
        pass
    with atomic_write_dir(final, overwrite=True) as tmp:
        (tmp / "y").write_text("two")
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    assert [p.name for p in final.iterdir()] == ["y"]


def test_moe_experts_are_adapted_routed_and_isolated(moe_dir: Path) -> None:
    model = load_small(moe_dir)
    bank = AdapterBank(model)
    bank.create("a", LoraConfig(rank=4, seed=1))
    bank.create("b", LoraConfig(rank=4, seed=2, train_attn=False))
    expert_keys = {k for k in bank._adapters["a"].weights if ".experts." in k}
    assert expert_keys == {t.key for t in model.lora_targets() if ".experts." in t.key} and expert_keys
    toks = tokens(B=3, T=5)
    base = model.logits(model(toks))
    assert torch.equal(logits_for(model, bank, ["a", "b", None], toks), base)
    perturb(bank, "a", 1)
    perturb(bank, "b", 2)
    ids: list[str | None] = ["a", "b", None]
    mixed = logits_for(model, bank, ids, toks)
    for r, aid in enumerate(ids):
        assert (mixed[r] - logits_for(model, bank, [aid], toks[r : r + 1])[0]).abs().max() <= 1e-6
    assert (mixed[0] - base[0]).abs().max() > 1e-3
    b0 = snapshot(bank, "b")
    train_step(model, bank, "a", 3, HP)
    ad = bank._adapters["a"]
    assert any(n in ad.optim for n in (f"{k}.lora_A" for k in expert_keys)), "no expert received a gradient"
    assert_same(b0, snapshot(bank, "b"))
    assert not bank.has_grad("b")


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_batch_invariant_mode_mixed_batch_is_bitwise_equal_to_rows_alone(
    family: str, llama_dir: Path, moe_dir: Path
) -> None:
    pytest.importorskip("treadle.ops.batch_invariant")
    model = load_small(llama_dir if family == "llama" else moe_dir)
    bank = AdapterBank(model)
    bank.create("a", LoraConfig(rank=8, seed=1))
    bank.create("b", LoraConfig(rank=4, seed=2, train_mlp=False))
    perturb(bank, "a", 1)
    perturb(bank, "b", 2)
    toks = tokens(B=4)
    ids: list[str | None] = ["a", None, "b", "a"]
    with ops.mode("batch_invariant"):
        mixed = logits_for(model, bank, ids, toks)
        for r, aid in enumerate(ids):
            assert torch.equal(mixed[r], logits_for(model, bank, [aid], toks[r : r + 1])[0])
