"""FSDP2 across 2 ranks (gloo, CPU) through the sharded engine's public methods equals a plain `Engine`
(issue 12 §3): a fused multi-tenant forward_backward's logprobs, losses and metrics, the adapters after AdamW
steps (so their gradients), greedy samples, and a checkpoint saved by the sharded engine loaded into a plain
one. Deterministic mode: logprobs and losses bitwise equal to the plain engine's, everything bitwise repeatable
at a fixed world size. Faults: a dead follower fails the next op with a server error; closing the engine, or
killing rank 0, leaves no follower process.

Each test starts real follower processes (`make_engine(EngineSpec(..., shards=2))`), one thread per rank."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from treadle.engine.engine import Engine
from treadle.engine.placement.api import EngineSpec, WorkerLostError
from treadle.engine.placement.local import make_engine
from treadle.engine.sharded import ShardedEngine
from treadle.engine.types import (
    AdamParams,
    Datum,
    ForwardBackwardRequest,
    ForwardBackwardResult,
    LoraConfig,
    SampleRequest,
    SamplingParams,
)
from treadle.errors import TreadleError

pytestmark = pytest.mark.slow

# tenants of different ranks and targets in one fused batch; "c" trains only the unembedding, so its backward
# reaches no decoder block (the pad rows keep the ranks' backward passes in step anyway)
ADAPTERS = {
    "a": LoraConfig(rank=4, seed=0),
    "b": LoraConfig(rank=8, seed=1),
    "c": LoraConfig(rank=4, seed=2, train_attn=False, train_mlp=False),
}
LENGTHS = (400, 330, 60, 9)  # > 2048 padded tokens: two 2-rank micro-batches, tenants dealt unevenly (pads)
ADAM = AdamParams(learning_rate=1e-2)


def _spec(model_dir: Path, *, shards: int, deterministic: bool = False) -> EngineSpec:
    return EngineSpec(str(model_dir), shards=shards, deterministic=deterministic, kv_cache_mb=64)


def _requests(
    vocab: int, seed: int, names: tuple[str, ...] = tuple(ADAPTERS), lengths: tuple[int, ...] = LENGTHS
) -> list[ForwardBackwardRequest]:
    """One request per tenant, a forward-only one, and an invalid one (last; it fails alone, on every rank)."""
    g = torch.Generator().manual_seed(seed)

    def datum(n: int) -> Datum:
        toks = torch.randint(0, vocab, (n + 1,), generator=g)
        return Datum(
            toks[:-1].clone(), {"target_tokens": toks[1:].clone(), "weights": torch.rand(n, generator=g)}
        )

    reqs = [ForwardBackwardRequest(aid, [datum(n) for n in lengths], "cross_entropy") for aid in names]
    reqs.append(ForwardBackwardRequest(names[0], [datum(30), datum(5)], "cross_entropy", forward_only=True))
    bad = datum(4)
    bad.tokens[0] = vocab
    reqs.append(ForwardBackwardRequest(names[1], [bad], "cross_entropy"))
    return reqs


def _train(
    engine: Engine, ids: dict[str, LoraConfig], steps: int = 2, lengths: tuple[int, ...] = LENGTHS
) -> list[list[ForwardBackwardResult]]:
    """`steps` × (one fused forward_backward of every tenant, then an AdamW step each)."""
    for aid, cfg in ids.items():
        engine.create_adapter(aid, cfg)
    out = []
    for step in range(steps):
        reqs = _requests(engine.info.vocab_size, step, tuple(ids), lengths)
        results = engine.forward_backward(reqs)
        assert isinstance(results[-1], TreadleError) and "data[0].model_input" in str(results[-1])
        assert all(isinstance(r, ForwardBackwardResult) for r in results[:-1])
        out.append([r for r in results[:-1] if isinstance(r, ForwardBackwardResult)])
        for aid in ids:
            engine.optim_step(aid, ADAM)
    return out


def _weights(engine: Engine, aid: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in engine.bank.trainable_parameters(aid)]


def _greedy(engine: Engine, aid: str | None) -> list[int]:
    req = SampleRequest(aid, [1, 17, 300, 4242, 9], SamplingParams(max_tokens=12, temperature=0.0))
    return list(engine.sample(req).result(timeout=120).sequences[0].tokens)


def _gone(pid: int) -> bool:
    """The process has exited (a zombie counts: an orphan's reaper may be slow, or absent in a container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.fixture
def engines(tiny_model_dir: Path) -> Iterator[tuple[ShardedEngine, Engine]]:
    sharded = make_engine(_spec(tiny_model_dir, shards=2))
    plain = make_engine(_spec(tiny_model_dir, shards=1))
    assert isinstance(sharded, ShardedEngine)
    yield sharded, plain
    plain.close()
    sharded.close()


def _assert_results_close(
    got: list[ForwardBackwardResult], ref: list[ForwardBackwardResult], atol: float
) -> None:
    for g, r in zip(got, ref, strict=True):
        for gd, rd in zip(g.loss_fn_outputs, r.loss_fn_outputs, strict=True):
            assert gd.keys() == rd.keys()
            for k in rd:
                torch.testing.assert_close(gd[k], rd[k], rtol=0, atol=atol)
        assert g.metrics.keys() == r.metrics.keys()
        for k in r.metrics:
            assert g.metrics[k] == pytest.approx(r.metrics[k], rel=1e-5)


def test_sharded_engine_equals_plain_engine(engines: tuple[ShardedEngine, Engine], tmp_path: Path) -> None:
    sharded, plain = engines
    block: Any = sharded.model.model.layers[0]
    weight = block.self_attn.q_proj.weight
    assert weight.to_local().numel() < weight.numel(), "the blocks are not sharded"

    got, ref = _train(sharded, ADAPTERS), _train(plain, ADAPTERS)
    for g, r in zip(got, ref, strict=True):
        _assert_results_close(g, r, atol=1e-4)
    for aid in ADAPTERS:  # after 2 AdamW steps: the gradients agreed
        for g, r in zip(_weights(sharded, aid), _weights(plain, aid), strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)

    for aid in (None, "a", "b"):
        assert _greedy(sharded, aid) == _greedy(plain, aid)

    sharded.save_adapter("b", tmp_path / "b", optimizer=True)
    plain.load_adapter("b_from_shards", tmp_path / "b", optimizer=True)
    for g, r in zip(_weights(plain, "b_from_shards"), _weights(sharded, "b"), strict=True):
        assert torch.equal(g, r)
    # a checkpoint loads on every rank (with its optimizer state) and trains on like the plain engine's copy
    sharded.load_adapter("b_again", tmp_path / "b", optimizer=True)
    sharded.snapshot_adapter("b_again", "b_snap")
    sharded.remove_adapter("b_snap")
    data = _requests(sharded.info.vocab_size, seed=5)[0].data
    got_b = sharded.forward_backward([ForwardBackwardRequest("b_again", data, "cross_entropy")])
    ref_b = plain.forward_backward([ForwardBackwardRequest("b_from_shards", data, "cross_entropy")])
    _assert_results_close(got_b, ref_b, atol=1e-4)  # type: ignore[arg-type]
    sharded.optim_step("b_again", ADAM)
    plain.optim_step("b_from_shards", ADAM)
    for g, r in zip(_weights(sharded, "b_again"), _weights(plain, "b_from_shards"), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert sharded.health()["shards"] == 2

    lost: list[str] = []
    sharded.set_lost_handler(lost.append)  # what Worker registers: the loss is reported while idle
    pids = sharded.follower_pids
    os.kill(pids[0], signal.SIGKILL)  # a dead follower: the next op fails with a server error
    deadline = time.monotonic() + 10
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(lost) == 1 and "rank 1 exited" in lost[0]
    with pytest.raises(WorkerLostError, match="rank 1"):
        sharded.forward_backward(_requests(sharded.info.vocab_size, seed=0)[:1])
    with pytest.raises(WorkerLostError):
        sharded.health()
    sharded.close()
    assert all(_gone(pid) for pid in pids)


_RANK0 = """
import sys, time
from treadle.engine.placement.api import EngineSpec
from treadle.engine.placement.local import make_engine
e = make_engine(EngineSpec(sys.argv[1], shards=2, kv_cache_mb=64))
print(*e.follower_pids, flush=True)
time.sleep(600)
"""


def test_followers_exit_when_rank0_is_killed(tiny_model_dir: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rank0 = subprocess.Popen(
        [sys.executable, "-c", _RANK0, str(tiny_model_dir)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert rank0.stdout is not None
        ready, _, _ = select.select([rank0.stdout], [], [], 180)
        assert ready, "rank 0 did not start its engine"
        pids = [int(p) for p in rank0.stdout.readline().split()]
        assert pids and not any(_gone(pid) for pid in pids)
    finally:
        rank0.kill()
        rank0.wait()
    deadline = time.monotonic() + 15
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(pid) for pid in pids)


def test_deterministic_mode(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Bitwise: logprobs and losses equal the plain engine's; training is repeatable at a fixed world size
    (two identical tenants in one engine end bitwise equal). Gradients are compared within fp tolerance only:
    the rank partial sums change their reduction tree (sharded.py)."""
    sharded = make_engine(_spec(tiny_model_dir, shards=2, deterministic=True))
    assert isinstance(sharded, ShardedEngine)
    plain = make_engine(_spec(tiny_model_dir, shards=1, deterministic=True))
    try:
        short = (120, 60, 9)  # batch-invariant kernels are slow; the lockstep test above has the long rows
        got, ref = _train(sharded, ADAPTERS, 1, short), _train(plain, ADAPTERS, 1, short)
        for g, r in zip(got[0], ref[0], strict=True):
            assert g.metrics == r.metrics
            for gd, rd in zip(g.loss_fn_outputs, r.loss_fn_outputs, strict=True):
                for k in rd:
                    assert torch.equal(gd[k], rd[k]), k
        again = _train(sharded, {aid + "2": cfg for aid, cfg in ADAPTERS.items()}, 1, short)
        for g, r in zip(again[0], got[0], strict=True):
            assert g.metrics == r.metrics
            for gd, rd in zip(g.loss_fn_outputs, r.loss_fn_outputs, strict=True):
                assert all(torch.equal(gd[k], rd[k]) for k in rd)
        for aid in ADAPTERS:
            for g, r in zip(_weights(sharded, aid + "2"), _weights(sharded, aid), strict=True):
                assert torch.equal(g, r)
            for g, r in zip(_weights(sharded, aid), _weights(plain, aid), strict=True):
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    finally:
        plain.close()
        pids = sharded.follower_pids
        sharded.close()
    assert pids and all(_gone(pid) for pid in pids)  # a clean close leaves no follower either
