"""FSDP2 across 2 ranks (gloo, CPU) gives the single-process results: a fused multi-tenant forward_backward's
per-datum logprobs and losses, and every adapter's LoRA gradients (issue 12 §3). The sharded side runs as
two real processes in a real gloo group; the reference runs here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from treadle.engine import trainer
from treadle.engine.types import Datum, ForwardBackwardRequest, LoraConfig
from treadle.lora.bank import AdapterBank
from treadle.models.loader import load_model

ADAPTERS = {"a": 4, "b": 8, "c": 4}  # id -> rank: tenants of different ranks in one fused batch
WORLD = 2


def _setup(model_dir: str) -> tuple[object, AdapterBank, list[ForwardBackwardRequest]]:
    loaded = load_model(model_dir)
    model = loaded.model
    bank = AdapterBank(model)
    g = torch.Generator().manual_seed(7)
    for i, (aid, rank) in enumerate(ADAPTERS.items()):
        bank.create(aid, LoraConfig(rank=rank, seed=i))
        with torch.no_grad():  # B starts at zero; make every A and B carry a gradient
            for p in bank.trainable_parameters(aid):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    vocab = model.config.vocab_size
    requests = []
    for aid in ADAPTERS:
        data = []
        for n in (5, 9, 3, 12, 7):
            toks = torch.randint(0, vocab, (n + 1,), generator=g)
            data.append(
                Datum(
                    toks[:-1].clone(),
                    {"target_tokens": toks[1:].clone(), "weights": torch.rand(n, generator=g)},
                )
            )
        requests.append(ForwardBackwardRequest(aid, data, "cross_entropy"))
    return model, bank, requests


def _run(model: object, bank: AdapterBank, requests: list[ForwardBackwardRequest]) -> list:
    cfg = model.config  # type: ignore[attr-defined]
    return trainer.forward_backward(
        model,  # type: ignore[arg-type]
        bank,
        requests,
        vocab_size=cfg.vocab_size,
        max_len=cfg.max_position_embeddings,
    )


_RANK = """
import json, os, sys, torch
import torch.distributed as dist
sys.path.insert(0, os.environ["TEST_DIR"])
from test_fsdp_parity import ADAPTERS, _run, _setup
from treadle.engine.sharding import deal_rows, device_mesh, reduce_adapter_grads, shard_blocks

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model, bank, requests = _setup(sys.argv[1])
shard_blocks(model, device_mesh(world))
full = model.model.layers[0].self_attn.q_proj.weight
assert full.to_local().numel() < full.numel(), "blocks are not sharded"
mine = [
    type(r)(r.adapter_id, [r.data[i] for i in deal_rows(len(r.data), rank, world)], r.loss_fn) for r in requests
]
results = _run(model, bank, mine)
reduce_adapter_grads(bank, list(ADAPTERS))
out = {"rows": {}, "grads": {}}
for r, req, res in zip(requests, mine, results):
    for i, lf in zip(deal_rows(len(r.data), rank, world), res.loss_fn_outputs):
        out["rows"][f"{r.adapter_id}/{i}"] = {k: v.tolist() for k, v in lf.items()}
for aid in ADAPTERS:
    out["grads"][aid] = [p.grad.tolist() for p in bank.trainable_parameters(aid)]
json.dump(out, open(sys.argv[2] + f"/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sharded(model_dir: Path, out: Path) -> list[dict]:
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(WORLD),
            TEST_DIR=str(Path(__file__).parent),
            OMP_NUM_THREADS="1",
        )
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK, str(model_dir), str(out)], env=env))
    for p in procs:
        assert p.wait(timeout=240) == 0
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.slow
def test_two_ranks_equal_one_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    ranks = _sharded(tiny_model_dir, tmp_path)
    model, bank, requests = _setup(str(tiny_model_dir))
    results = _run(model, bank, requests)

    sharded_rows = ranks[0]["rows"] | ranks[1]["rows"]
    for req, res in zip(requests, results, strict=True):
        for i, lf in enumerate(res.loss_fn_outputs):
            got = sharded_rows[f"{req.adapter_id}/{i}"]
            for key, ref in lf.items():
                torch.testing.assert_close(torch.tensor(got[key]), ref, rtol=0, atol=1e-5)
    for aid in ADAPTERS:
        ref_grads = [p.grad for p in bank.trainable_parameters(aid)]
        assert ref_grads and all(g is not None for g in ref_grads)
        for rank_out in ranks:  # every rank ends with the same, full gradient
            for got, ref in zip(rank_out["grads"][aid], ref_grads, strict=True):
                torch.testing.assert_close(torch.tensor(got), ref, rtol=1e-5, atol=1e-6)
    # the fixed-order reduction leaves the ranks bitwise identical
    assert ranks[0]["grads"] == ranks[1]["grads"]
