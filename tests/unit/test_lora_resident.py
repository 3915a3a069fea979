"""Many adapters resident, memory bounded as tenants come and go: every tensor of a removed adapter (and of
its sampling snapshots) is freed, whatever training and sampling it went through, so memory held by the
engine depends on the tenants present, not on how many have passed."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch

from treadle.engine.engine import Engine
from treadle.engine.types import (
    AdamParams,
    Datum,
    ForwardBackwardRequest,
    LoraConfig,
    SampleRequest,
    SamplingParams,
)


def _datum(seed: int) -> Datum:
    t = torch.randint(5, 200, (13,), generator=torch.Generator().manual_seed(seed))
    return Datum(t[:-1], {"target_tokens": t[1:], "weights": torch.ones(12)})


def _adapter_tensors(engine: Engine, adapter_id: str) -> list[torch.Tensor]:
    ad = engine.bank._adapters[adapter_id]
    out = [p for _, p in ad.named_parameters()]
    out += [t for st in ad.optim.values() for t in (st.exp_avg, st.exp_avg_sq)]
    return out


@pytest.mark.slow
def test_tenants_come_and_go_and_their_tensors_leave_memory(tiny_model_dir: Path) -> None:
    engine = Engine(str(tiny_model_dir))
    try:
        resident = [f"keep{i}" for i in range(64)]  # 64 adapters stay resident (rank 16-32) throughout
        for i, a in enumerate(resident):
            engine.create_adapter(a, LoraConfig(rank=16 if i % 2 else 32, seed=i))
        per_rank = {
            r: sum(t.numel() * t.element_size() for t in _adapter_tensors(engine, f"keep{i}"))
            for i, r in ((0, 32), (1, 16))
        }
        assert per_rank[32] == 2 * per_rank[16] > 0  # weights only until trained: linear in rank

        gone: list[weakref.ref[torch.Tensor]] = []
        params = SamplingParams(max_tokens=4, temperature=1.0, seed=0, stop=())
        for cycle in range(3):  # tenants arrive, train, snapshot, sample, leave
            ids = [f"c{cycle}t{j}" for j in range(2)]
            for j, a in enumerate(ids):
                engine.create_adapter(a, LoraConfig(rank=16, seed=100 + j))
            res = engine.forward_backward(
                [ForwardBackwardRequest(a, [_datum(j)], "cross_entropy") for j, a in enumerate(ids)]
            )
            assert not any(isinstance(r, Exception) for r in res)
            snaps = []
            for a in ids:
                engine.optim_step(a, AdamParams(learning_rate=1e-3))
                engine.snapshot_adapter(a, f"{a}-snap")
                snaps.append(f"{a}-snap")
            engine.generate(SampleRequest(snaps[0], [1, 2, 3, 4], params))
            for a in ids + snaps:
                gone += [weakref.ref(t) for t in _adapter_tensors(engine, a)]
                engine.remove_adapter(a)
        assert sorted(engine.bank.ids()) == sorted(resident)
        gc.collect()
        alive = sum(r() is not None for r in gone)
        assert len(gone) > 0 and alive == 0, f"{alive} of {len(gone)} tensors of departed tenants still held"
    finally:
        engine.close()
