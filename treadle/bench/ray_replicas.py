"""Ray placement, two tenants training at once: 2 replicas (one tenant each, half the CPUs each) vs 1 replica
holding both tenants (all the CPUs), on a local Ray runtime started for the run (issue 12 §5).

The honest question on a small CPU machine is not "does it scale" (2 replicas on 2 cores share the same two
cores that 1 replica with 2 threads uses) but "is anything serialized that should not be": if the replicas'
compute overlaps, the actors' processes keep the cores busy at once. Measured from outside the actors: the CPU
seconds of each actor's process (psutil, same node) over the wall time of the run, i.e. how many cores were busy
in model code, and the share of the run during which both tenants had a training call in flight. The two
set-ups take turns and the median run of each is reported.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from treadle.bench.runner import Row
from treadle.bench.train import sft_batch
from treadle.engine.placement import ray_engine
from treadle.engine.placement.api import EngineSpec
from treadle.engine.placement.ray_engine import RayEngine
from treadle.engine.types import AdamParams, ForwardBackwardRequest, LoraConfig

RANK = 16
Result = tuple[float, float, float]


def _cpu_s(pid: int | None) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


Lane = tuple[RayEngine, list[str]]  # one thread driving one replica; several adapters: fused in one call


def _run(
    lanes: list[Lane], data: dict[str, Any], steps: int
) -> tuple[float, list[list[tuple[float, float]]]]:
    """Every lane runs `steps` forward_backward (one request per adapter, fused) + optim_steps on its replica,
    all lanes at once (one thread each, as the service's scheduler threads would). Returns the wall time and
    each lane's call intervals."""
    spans: list[list[tuple[float, float]]] = [[] for _ in lanes]
    go = threading.Barrier(len(lanes) + 1)

    def lane(k: int) -> None:
        engine, adapters = lanes[k]
        go.wait()
        for _ in range(steps):
            t0 = time.perf_counter()
            res = engine.forward_backward(
                [ForwardBackwardRequest(a, data[a], "cross_entropy") for a in adapters]
            )
            assert not any(isinstance(r, Exception) for r in res), res
            for a in adapters:
                engine.optim_step(a, AdamParams(learning_rate=1e-4))
            spans[k].append((t0, time.perf_counter()))

    threads = [threading.Thread(target=lane, args=(k,)) for k in range(len(lanes))]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, spans


def _both_busy(spans: list[list[tuple[float, float]]], wall: float) -> float:
    """Share of the run during which both lanes had a call in flight (0 with one lane)."""
    if len(spans) != 2:
        return 0.0
    a, b = spans
    overlap = sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)
    return overlap / wall


def _measure(engines: list[RayEngine], lanes: list[Lane], data: dict[str, Any], steps: int) -> Result:
    """(tenant steps/s, cores busy in the actors, share of the run with both lanes in flight)."""
    cpu0 = [_cpu_s(e.pid) for e in engines]
    wall, spans = _run(lanes, data, steps)
    cores = sum(_cpu_s(e.pid) - c for e, c in zip(engines, cpu0, strict=True)) / wall
    n_steps = steps * sum(len(adapters) for _e, adapters in lanes)
    return n_steps / wall, cores, _both_busy(spans, wall)


def _median(runs: list[Result]) -> Result:
    """The run with the median rate (its three figures belong together)."""
    return sorted(runs)[len(runs) // 2]


def bench_ray(model: str, *, quick: bool = False) -> tuple[list[Row], dict[str, object]]:
    cpus = os.cpu_count() or 1
    half = max(1, cpus // 2)
    repeat, steps, rows_per, seq = (1, 2, 1, 32) if quick else (3, 3, 2, 32)
    spec = EngineSpec(model, max_lora_rank=RANK)
    # The set-ups stay up for the whole run and take turns (A, B, C, A, ...), so the drift of a shared machine
    # hits both alike: Ray is told of twice the CPUs so the 3 actors fit; only one set-up computes at a time.
    ray_engine.connect(None, num_cpus=2 * cpus)
    engines: list[RayEngine] = []
    try:
        # baseline: one replica with every CPU, both tenants' adapters on it
        one = RayEngine(spec, replica=0, num_cpus=cpus, env={"OMP_NUM_THREADS": str(cpus)})
        engines.append(one)
        two = [
            RayEngine(spec, replica=r, num_cpus=cpus / 2, env={"OMP_NUM_THREADS": str(half)}) for r in (1, 2)
        ]
        engines += two
        for k in range(2):
            one.create_adapter(f"t{k}", LoraConfig(rank=RANK, seed=k))
            two[k].create_adapter(f"t{k}", LoraConfig(rank=RANK, seed=k))
        data = {f"t{k}": sft_batch(rows_per, seq, one.info.vocab_size, seed=10 + k) for k in range(2)}
        set_ups: dict[str, tuple[list[RayEngine], list[Lane]]] = {
            "1 replica, 2 tenants": ([one], [(one, ["t0"]), (one, ["t1"])]),
            "1 replica, 2 tenants fused": ([one], [(one, ["t0", "t1"])]),
            "2 replicas, 1 tenant each": (two, [(two[0], ["t0"]), (two[1], ["t1"])]),
        }
        for _es, lanes in set_ups.values():
            _run(lanes, data, 1)  # warm-up: first-call allocations
        runs: dict[str, list[Result]] = {name: [] for name in set_ups}
        for _ in range(repeat):
            for name, (es, lanes) in set_ups.items():
                runs[name].append(_measure(es, lanes, data, steps))
        res = {name: _median(r) for name, r in runs.items()}
    finally:
        for e in engines:
            e.close()
        ray_engine.shutdown()
    for name, (rate, cores, both) in res.items():
        print(
            f"{name}: {rate:.2f} steps/s, {cores:.2f} of {cpus} cores busy in the actors, two calls in flight "
            f"{both:.0%} of the run"
        )
    base, fused, rep = res.values()
    batch = f"{rows_per}x{seq}"
    rows = [
        Row(f"ray 2 tenants ({batch}): 2 replicas vs 1", rep[0], base[0], "steps/s", 0.9),
        Row(f"ray 2 tenants ({batch}): 2 replicas vs 1 fused", rep[0], fused[0], "steps/s", 0.9),
        # replicas that never computed at once would keep about half the cores busy that one replica does
        Row("ray 2 replicas: cores busy vs 1 replica", rep[1], base[1], "cores", 0.9),
    ]
    extra: dict[str, object] = {
        "cpus": cpus,
        **{
            name: {"steps_per_s": r[0], "cores_busy": r[1], "both_in_flight": r[2]} for name, r in res.items()
        },
    }
    return rows, extra
