"""Build the worker pool of a server: one worker per served model (and per replica), in the chosen placement.

- `inprocess`: engines share this process and one compute thread (`treadle.engine.compute`); tests and the
  `Engine` Python API.
- `subprocess` (the default of `treadle serve`): one child process per model; the server process does no tensor
  work. With several models on a small machine, the OpenMP threads are split between the children.
- `ray`: each replica is a Ray actor (`treadle serve --ray [ADDRESS] --replicas N`); Ray places the actors on
  the devices they ask for, on this machine or across a cluster.
"""

from __future__ import annotations

import os
from typing import Literal

from treadle.engine.placement.api import EngineSpec
from treadle.engine.worker import Worker, WorkerPool
from treadle.errors import UserError

Placement = Literal["inprocess", "subprocess", "ray"]  # the values of `placement`
PLACEMENTS: tuple[Placement, ...] = ("inprocess", "subprocess", "ray")


def build_pool(
    specs: list[EngineSpec],
    placement: str = "subprocess",
    *,
    replicas: int = 1,
    ray_address: str | None = None,
) -> WorkerPool:
    if placement not in PLACEMENTS:
        raise UserError(
            f"placement: must be one of {', '.join(PLACEMENTS)}, got {placement!r}", field="placement"
        )
    if not isinstance(replicas, int) or replicas < 1:
        raise UserError(f"--replicas: must be an integer ≥ 1, got {replicas!r}", field="replicas")
    if replicas > 1 and placement != "ray":
        raise UserError(
            "--replicas: several replicas of a model need Ray; add --ray [ADDRESS]", field="replicas"
        )
    workers: list[Worker] = []
    try:
        if placement == "inprocess":
            return _inprocess(specs)
        if placement == "subprocess":
            env = _thread_split(len(specs))
            from treadle.engine.placement.subprocess_engine import SubprocessEngine

            for spec in specs:
                workers.append(Worker(spec.model, SubprocessEngine(spec, env=env)))
            return WorkerPool(workers)
        from treadle.engine.placement import ray_engine

        ray_engine.connect(ray_address)
        for spec in specs:
            for r in range(replicas):
                workers.append(Worker(spec.model, ray_engine.RayEngine(spec, replica=r), replica=r))
        return WorkerPool(workers, close=ray_engine.shutdown)
    except BaseException:
        for w in workers:
            w.stop()
        raise


def _inprocess(specs: list[EngineSpec]) -> WorkerPool:
    from treadle.engine.compute import ComputeThread
    from treadle.engine.placement.local import make_engine

    compute = ComputeThread()  # one thread computes for every served model: see treadle.engine.compute
    workers: list[Worker] = []
    try:
        for spec in specs:
            workers.append(Worker(spec.model, make_engine(spec, compute)))
    except BaseException:
        for w in workers:
            w.stop()
        compute.close()
        raise
    return WorkerPool(workers, close=compute.close)


def _thread_split(n_workers: int) -> dict[str, str]:
    """Several worker processes on few cores: give each an equal share of OpenMP threads (unless the user set
    OMP_NUM_THREADS), so their thread teams do not oversubscribe the CPUs (see treadle.engine.compute)."""
    if n_workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n_workers))}
