"""ShardedEngine: one base model over N ranks with FSDP2, behind the same methods as `Engine`
(`treadle serve --shards N`, `make_engine(EngineSpec(..., shards=N))`).

The process that builds it is rank 0: it starts ranks 1..N-1 itself (`python -m treadle.engine.shard_follower`,
with MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE), every rank loads the model and shards its decoder blocks with
`sharding.shard_blocks` (gloo on CPU, NCCL on CUDA, one GPU per rank). Rank 0 is an ordinary `Engine` (adapter
bank, sampler, compute thread) whose model happens to be sharded; the followers are passive.

Design (the simplest that keeps the collectives in lockstep):
- Rank 0 talks to each follower over a pair of pipes, and sends every command from its compute thread, the one
  thread that issues its collectives. A follower runs the commands one by one in that order, so every rank
  issues the same collectives in the same order.
- Training: rank 0 sends the fused forward_backward batch; every rank runs `sharding.forward_backward_share`
  (same micro-batch plan from the whole batch, its round-robin rows, zero-weight pad rows so every rank runs
  the same forward/backward passes; adapter gradients summed in rank order); the followers send their rows'
  results back and rank 0 assembles the per-request results exactly as `trainer.forward_backward` does.
- Sampling runs on rank 0 only. A forward pre-hook on rank 0's model sends ("forward",) before each sampler
  model call; the follower answers with a one-token forward of its own, whose only purpose is to take part in
  the same per-block all-gathers (a forward without backward all-gathers each block once, in order).
- Adapters are replicated: create (with rank 0's initial weights, so an unseeded init cannot differ), remove,
  snapshot, load and optim_step run on rank 0 first, then on every follower, which acknowledges; identical
  gradients and states make identical AdamW steps. save_adapter is rank 0's alone.
- Lifetime: `close` tells the followers to leave and waits for them; a follower also exits when its command
  pipe reads EOF (rank 0 died), when its parent is gone, or when a collective fails. When a follower dies,
  the running op and every later one fail with `WorkerLostError` (category server) and `health` raises.

Numerics: per-datum logprobs and losses equal the single-process engine's within fp tolerance (a row's
forward sees the same full weights, re-assembled by the all-gather, but runs in a differently shaped batch),
and so do the LoRA gradients, which are bitwise identical on every rank by construction (every rank adds the
same gathered parts in the same order). Deterministic mode (`deterministic=True`: batch-invariant kernels)
makes a row's forward independent of its batch-mates, so logprobs and losses are bitwise equal to the
single-process engine's; gradients are not (the reduction over the batch's tokens becomes per-rank partial
sums added in rank order: a different summation tree, see sharding.py), but they are bitwise repeatable at a
fixed world size. tests/unit/test_fsdp_parity.py checks the parity, the bitwise forward and the repeatability.
Through `treadle serve --deterministic --shards 2` a run's first losses are bitwise those of one process and
later ones differ in the last bits, once a step's gradients came from the two-rank sum.

One sharded engine per process: it owns the process's default process group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from treadle.engine import sharding
from treadle.engine.compute import ComputeThread
from treadle.engine.engine import Engine
from treadle.engine.placement import wire
from treadle.engine.placement.api import EngineSpec, WorkerLostError
from treadle.engine.types import (
    AdamParams,
    ForwardBackwardRequest,
    ForwardBackwardResult,
    LoraConfig,
)
from treadle.errors import NotFoundError, TreadleError, UserError, require
from treadle.models.loader import LoadedModel

T = TypeVar("T")


@dataclasses.dataclass
class _Follower:
    rank: int
    proc: subprocess.Popen[bytes]
    cmd: Connection
    reply: Connection


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ShardedEngine(Engine):
    """Rank 0 of an FSDP2 group of `spec.shards` ranks (see the module docstring)."""

    def __init__(self, spec: EngineSpec, compute: ComputeThread | None = None) -> None:
        require(
            isinstance(spec.shards, int) and spec.shards >= 2,
            "shards",
            f"a sharded engine needs an integer ≥ 2, got {spec.shards!r}",
        )
        if dist.is_initialized():
            raise UserError(
                "shards: this process already belongs to a process group (one sharded engine per process)",
                field="shards",
            )
        self.world = spec.shards
        self._device = sharding.rank_device(spec.device, 0)
        self._followers: list[_Follower] = []
        self._local_pass = False  # rank 0 runs its own share of a forward_backward: the followers run theirs
        self._lost: str | None = None
        self._lost_handler: Callable[[str], None] | None = None
        self._closed = False
        port = _free_port()
        try:
            self._spawn(spec, port)
            self._join(port)
            super().__init__(spec.model, compute=compute, **{**spec.engine_kwargs(), "device": self._device})
        except BaseException:
            self._stop_followers(ask=False)
            if dist.is_initialized():
                dist.destroy_process_group()
            raise
        threading.Thread(target=self._watch, name="treadle-shard-watch", daemon=True).start()

    # start-up -----------------------------------------------------------------------------------------
    def _spawn(self, spec: EngineSpec, port: int) -> None:
        threads = str(max(1, (os.cpu_count() or 1) // self.world))
        for rank in range(1, self.world):
            cmd_r, cmd_w = os.pipe()
            reply_r, reply_w = os.pipe()
            env = dict(
                os.environ,
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                RANK=str(rank),
                WORLD_SIZE=str(self.world),
            )
            env.setdefault("OMP_NUM_THREADS", threads)
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "treadle.engine.shard_follower", str(cmd_r), str(reply_w)],
                    env=env,
                    pass_fds=(cmd_r, reply_w),
                )
            except BaseException:
                os.close(cmd_w)
                os.close(reply_r)
                raise
            finally:  # the child's ends: only the child may hold them, so its death reads as EOF here
                os.close(cmd_r)
                os.close(reply_w)
            f = _Follower(rank, proc, Connection(cmd_w, readable=False), Connection(reply_r, writable=False))
            self._followers.append(f)
            wire.send(f.cmd, (spec,))

    def _join(self, port: int) -> None:
        """Join the group as rank 0 while watching the followers: one that dies first fails the start."""
        failure: list[BaseException] = []

        def init() -> None:
            try:
                sharding.init_group(self._device, 0, self.world, f"tcp://127.0.0.1:{port}")
            except BaseException as e:  # noqa: BLE001 - re-raised by the waiting thread
                failure.append(e)

        t = threading.Thread(target=init, name="treadle-shard-join", daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.2)
            for f in self._followers:
                if t.is_alive() and (rc := f.proc.poll()) is not None:
                    raise TreadleError(f"shards: rank {f.rank} exited (code {rc}) before joining the group")
        if failure:
            raise failure[0]

    def _prepare_model(self, loaded: LoadedModel) -> None:
        """On the compute thread (Engine's hook): shard the blocks, mirror the sampler's forwards, then wait
        until every follower has sharded its copy."""
        sharding.shard_blocks(loaded.model, sharding.device_mesh(self.world, self._device))
        loaded.model.register_forward_pre_hook(self._mirror_forward)
        self._replies()

    # talking to the followers (on the compute thread) -----------------------------------------------------
    def _mirror_forward(self, _module: torch.nn.Module, _args: Any) -> None:
        if not self._local_pass:
            self._send(("forward",))

    def set_lost_handler(self, handler: Callable[[str], None]) -> None:
        """`handler(why)` runs once, on a thread of its own, when a rank is found dead (the protocol of the
        placements whose process can die: `Worker` hands its listeners' notifier here). A process that hosts
        only this engine (a worker process) may exit from it, so that its placement restarts a fresh one."""
        self._lost_handler = handler

    def _watch(self) -> None:
        """Find a dead follower while nothing runs, so the loss is known before the next op."""
        while not self._closed and self._lost is None:
            for f in self._followers:
                if (rc := f.proc.poll()) is not None and not self._closed:
                    self._lose(f"rank {f.rank} exited (code {rc})")
                    return
            time.sleep(0.5)

    def _lose(self, why: str) -> WorkerLostError:
        first = self._lost is None
        self._lost = self._lost or why
        err = WorkerLostError(f"engine: the sharded engine's {self._lost}; it serves nothing more")
        if first and not self._closed and (handler := self._lost_handler) is not None:
            threading.Thread(
                target=handler, args=(err.message,), name="treadle-shard-lost", daemon=True
            ).start()
        return err

    def _check(self) -> None:
        if self._lost is not None:
            raise self._lose(self._lost)
        for f in self._followers:
            if (rc := f.proc.poll()) is not None:
                raise self._lose(f"rank {f.rank} exited (code {rc})")

    def _send(self, msg: tuple[Any, ...]) -> None:
        self._check()
        for f in self._followers:
            try:
                wire.send(f.cmd, msg)
            except (OSError, ValueError) as e:
                raise self._lose(f"rank {f.rank} is unreachable ({e})") from None

    def _replies(self) -> list[Any]:
        out: list[Any] = []
        bad: list[str] = []
        for f in self._followers:
            try:
                kind, value = wire.recv(f.reply)
            except (EOFError, OSError):
                raise self._lose(f"rank {f.rank} exited (code {f.proc.wait()})") from None
            if kind == "err":
                bad.append(f"rank {f.rank}: {value}")
            out.append(value)
        if bad:  # rank 0 did it, a follower could not: the replicas differ now
            raise self._lose("adapters diverged between ranks (" + "; ".join(bad) + ")")
        return out

    def _everywhere(self, local: Callable[[], T], msg: Callable[[T], tuple[Any, ...]]) -> T:
        """`local()` on rank 0; if it succeeded, the same op on every follower (`msg(result)`), acknowledged."""

        def job() -> T:
            self._check()
            value = local()
            self._send(msg(value))
            self._replies()
            return value

        return self.compute.call(job)

    # adapters (replicated) --------------------------------------------------------------------------------
    def create_adapter(self, adapter_id: str, cfg: LoraConfig) -> None:
        def local() -> list[torch.Tensor]:
            self.bank.create(adapter_id, cfg)
            return [p.detach().cpu().clone() for p in self.bank.trainable_parameters(adapter_id)]

        self._everywhere(local, lambda weights: ("create", adapter_id, cfg, weights))

    def remove_adapter(self, adapter_id: str) -> None:
        self._everywhere(lambda: self.bank.remove(adapter_id), lambda _: ("remove", adapter_id))

    def snapshot_adapter(self, src_id: str, dst_id: str) -> None:
        self._everywhere(lambda: self.bank.copy(src_id, dst_id), lambda _: ("copy", src_id, dst_id))

    def load_adapter(self, adapter_id: str, directory: Path, *, optimizer: bool) -> LoraConfig:
        if not Path(directory).is_dir():
            raise NotFoundError(f"path: no checkpoint directory at {directory}", field="path")
        d = Path(directory)
        return self._everywhere(
            lambda: self.bank.load(adapter_id, d, optimizer=optimizer),
            lambda _: ("load", adapter_id, d, optimizer),
        )

    def optim_step(self, adapter_id: str, params: AdamParams) -> dict[str, float]:
        params.validate()
        return self._everywhere(
            lambda: self.bank.optim_step(adapter_id, params), lambda _: ("optim_step", adapter_id, params)
        )

    # training -----------------------------------------------------------------------------------------
    def forward_backward(
        self, requests: list[ForwardBackwardRequest]
    ) -> list[ForwardBackwardResult | TreadleError]:
        errors: dict[int, TreadleError] = {}
        for i, r in enumerate(requests):
            try:
                self.prepare_forward_backward(r)
            except TreadleError as e:
                errors[i] = e
        valid = [r for i, r in enumerate(requests) if i not in errors]

        def run() -> list[ForwardBackwardResult | TreadleError]:
            self._check()
            self.sampler.release_idle_memory()
            self._send(("forward_backward", valid))
            self._local_pass = True
            try:
                invalid, per_datum = sharding.forward_backward_share(
                    self.model,
                    self.bank,
                    valid,
                    rank=0,
                    world_size=self.world,
                    vocab_size=self.info.vocab_size,
                    max_len=self.info.max_context_length,
                )
            except BaseException as e:
                dead = [(f.rank, rc) for f in self._followers if (rc := f.proc.poll()) is not None]
                err = self._lose(  # a follower that died under the collective that failed here, or rank 0
                    f"rank {dead[0][0]} exited (code {dead[0][1]}) during a step"
                    if dead
                    else f"rank 0 failed mid-step ({type(e).__name__}: {e})"
                )
                # the live followers may be waiting in a collective this rank will never issue
                self._stop_followers(ask=False)
                raise err from e
            finally:
                self._local_pass = False
            for theirs in self._replies():
                per_datum.update(theirs)
            return sharding.results(valid, invalid, per_datum)

        done = iter(self.compute.call(run))
        return [errors[i] if i in errors else next(done) for i in range(len(requests))]

    # health and lifetime ----------------------------------------------------------------------------------
    @property
    def follower_pids(self) -> list[int]:
        return [f.proc.pid for f in self._followers]

    def health(self) -> dict[str, Any]:
        self._check()
        return super().health() | {"shards": self.world}

    def _stop_followers(self, *, ask: bool, timeout: float = 10.0) -> None:
        for f in self._followers:
            if ask:
                with contextlib.suppress(OSError, ValueError):
                    wire.send(f.cmd, ("close",))
            with contextlib.suppress(OSError):
                f.cmd.close()
        for f in self._followers:
            try:
                f.proc.wait(timeout=timeout if ask else 0.5)
            except subprocess.TimeoutExpired:
                f.proc.kill()
                f.proc.wait()
            with contextlib.suppress(OSError):
                f.reply.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.sampler.close()
        finally:
            # after every queued job (their collectives need the followers), on the thread that sent them
            with contextlib.suppress(Exception):
                self.compute.call(lambda: None)
            self._stop_followers(ask=self._lost is None)
            if dist.is_initialized():
                dist.destroy_process_group()
            if self._owns_compute:
                self.compute.close()
