"""`treadle bench rl`: synchronous vs asynchronous RL on the same env when tools are slow, in one run.

Both modes train a fresh LoRA adapter on the same batches of the same env against one `treadle serve` subprocess,
with the same rollout, advantage and training code (the cookbook's `do_group_rollout`, `compute_advantages`,
`assemble_training_data`, `train_step`); only the schedule differs:

- sync: roll out batch i with the current weights, train on it, publish new weights, repeat (on-policy; the
  trainer waits for the slowest rollout of every batch).
- async: rollouts of batch j may start as soon as the trainer has finished step j − K (K = max steps off policy),
  with the newest weights at that moment; the trainer takes whichever B groups finished first. Staleness of a
  trained group = trainer step − weights version it was sampled with, at most K by construction, so no sample is
  thrown away (the cookbook's `AsyncConfig` instead runs B workers and requeues groups older than K; that caps
  the rollouts in flight at one batch, which is why this runner exists — it also records what the cookbook does
  not: trainer idle time and the staleness histogram).

Every env step (a tool call / environment reply) is delayed by an injected latency, e.g. 200 ms. The bench
prints wall-clock per training step, rollouts per second, the trainer's idle fraction, the staleness histogram
and mean reward per mode. Client-side only: it talks to the server through the official SDK.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from treadle.client_threads import limit_client_threads

API_KEY = "tml-bench-rl"


@dataclasses.dataclass(frozen=True)
class RLBenchConfig:
    """One bench run: B groups × G rollouts per step, `steps` steps per mode."""

    env: str = "arithmetic"
    groups_per_batch: int = 4
    group_size: int = 4
    steps: int = 16
    max_tokens: int = 8
    tool_latency_s: float = 0.2
    tool_calls_per_step: int = 1
    max_steps_off_policy: int = 2  # K = 1 caps the speed-up at 2x (step >= (R + T) / 2); K = 2 at 3x
    lora_rank: int = 8
    learning_rate: float = 4e-5
    renderer: str = "qwen3_instruct"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        for name in (
            "groups_per_batch",
            "group_size",
            "steps",
            "max_tokens",
            "lora_rank",
            "tool_calls_per_step",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tool_latency_s < 0:
            raise ValueError(f"tool_latency_s must be >= 0, got {self.tool_latency_s}")
        if self.max_steps_off_policy < 1:
            raise ValueError(
                f"max_steps_off_policy must be >= 1 (0 is the sync mode), got {self.max_steps_off_policy}"
            )
        if self.env not in BENCH_ENVS:
            raise ValueError(f"env must be one of {sorted(BENCH_ENVS)}, got {self.env!r}")


# Envs the bench can run: the cookbook's two offline recipes (more come from the treadle.rl env registry).
BENCH_ENVS = ("arithmetic", "guess_number")


@dataclasses.dataclass
class ModeResult:
    """What one mode measured."""

    mode: str
    steps: int
    wall_s: float
    train_busy_s: float
    rollouts: int
    tool_calls: int
    step_end_s: list[float]
    reward_per_step: list[float]
    staleness: dict[int, int]

    @property
    def s_per_step(self) -> float:
        return self.wall_s / self.steps

    @property
    def steady_s_per_step(self) -> float:
        """Wall-clock per step once the pipeline is full: from the end of step 1 to the end of the last step.
        Both modes pay the first step's rollouts before any training; a long run pays that once."""
        if len(self.step_end_s) < 2:
            return self.s_per_step
        return (self.step_end_s[-1] - self.step_end_s[0]) / (len(self.step_end_s) - 1)

    @property
    def rollouts_per_s(self) -> float:
        return self.rollouts / self.wall_s

    @property
    def idle_fraction(self) -> float:
        return max(0.0, 1.0 - self.train_busy_s / self.wall_s)

    @property
    def mean_reward(self) -> float:
        return sum(self.reward_per_step) / len(self.reward_per_step)

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {
            "s_per_step": self.s_per_step,
            "steady_s_per_step": self.steady_s_per_step,
            "rollouts_per_s": self.rollouts_per_s,
            "trainer_idle_fraction": self.idle_fraction,
            "mean_reward": self.mean_reward,
        }


# ---------------------------------------------------------------------------------------------------------------
# Injected tool latency: a wrapper env whose every step first waits, as a slow tool or environment would.


def _latency_types() -> tuple[type, type]:
    """The wrapper classes, built on first use so importing this module does not import the cookbook."""
    from tinker_cookbook.rl.types import Env, EnvGroupBuilder

    class SlowToolEnv(Env):
        def __init__(self, inner: Any, latency_s: float, calls: int, counter: list[int]) -> None:
            self.inner, self.latency_s, self.calls, self.counter = inner, latency_s, calls, counter

        async def initial_observation(self) -> Any:
            return await self.inner.initial_observation()

        async def step(self, action: list[int], *, extra: Any = None) -> Any:
            for _ in range(self.calls):  # sequential tool calls, as a ReAct turn makes them
                await asyncio.sleep(self.latency_s)
            self.counter[0] += self.calls
            result = await self.inner.step(action, extra=extra)
            return dataclasses.replace(result, reward=result.reward + _learning_signal(action))

    @dataclasses.dataclass(frozen=True)
    class SlowToolGroupBuilder(EnvGroupBuilder):
        inner: Any
        latency_s: float
        calls: int
        counter: list[int]

        async def make_envs(self) -> Sequence[Any]:
            envs = await self.inner.make_envs()
            return [SlowToolEnv(e, self.latency_s, self.calls, self.counter) for e in envs]

        async def compute_group_rewards(self, trajectory_group: list[Any], env_group: Sequence[Any]) -> Any:
            return await self.inner.compute_group_rewards(trajectory_group, [e.inner for e in env_group])

        async def cleanup(self) -> None:
            await self.inner.cleanup()

        def logging_tags(self) -> list[str]:
            return self.inner.logging_tags()

    return SlowToolEnv, SlowToolGroupBuilder


def _learning_signal(action: Sequence[int]) -> float:
    """A small deterministic reward term (-0.02..0.02) from the answer's tokens.

    The bench's random-init model earns the same format penalty on every rollout, so every advantage would be
    zero and the trainer would have no position to backpropagate (it skips those). This term gives the rollouts
    of a group different rewards, as a learning signal does, so each step trains the answer tokens as a real run
    would."""
    return ((sum(action) * 2654435761) % 5 - 2) / 100


def _dataset(cfg: RLBenchConfig, renderer: Any) -> Any:
    if cfg.env == "arithmetic":
        from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticDataset

        return ArithmeticDataset(cfg.groups_per_batch, renderer, cfg.group_size, n_batches=cfg.steps)
    from tinker_cookbook.recipes.multiplayer_rl.guess_number.env import GuessNumberDataset

    answers = [(37 * i + 11) % 1024 for i in range(cfg.groups_per_batch * cfg.steps)]
    return GuessNumberDataset(answers, renderer, cfg.groups_per_batch, cfg.group_size)


def _batches(cfg: RLBenchConfig, renderer: Any, counter: list[int]) -> list[list[Any]]:
    _, builder_cls = _latency_types()
    ds = _dataset(cfg, renderer)
    return [
        [builder_cls(b, cfg.tool_latency_s, cfg.tool_calls_per_step, counter) for b in ds.get_batch(i)]
        for i in range(cfg.steps)
    ]


# ---------------------------------------------------------------------------------------------------------------
# The two schedules.


async def _train(tc: Any, groups: list[Any], cfg: RLBenchConfig) -> Any:
    """One cookbook training step on the groups; returns a sampling client of the new weights."""
    from tinker_cookbook.rl.data_processing import assemble_training_data, compute_advantages
    from tinker_cookbook.rl.train import train_step

    data, _ = assemble_training_data(groups, compute_advantages(groups))
    await train_step(data, tc, cfg.learning_rate, 1, "importance_sampling")
    return await tc.save_weights_and_get_sampling_client_async()


def _progress(mode: str, step: int, steps: int, elapsed_s: float) -> None:
    print(f"  {mode}: step {step}/{steps} done at {elapsed_s:.1f} s", file=sys.stderr, flush=True)


def _mean_reward(groups: list[Any]) -> float:
    rewards = [r for g in groups for r in g.get_total_rewards()]
    return sum(rewards) / len(rewards)


async def _rollout(builder: Any, sampler: Any, cfg: RLBenchConfig) -> Any:
    from tinker_cookbook.completers import TinkerTokenCompleter
    from tinker_cookbook.rl.rollouts import do_group_rollout

    return await do_group_rollout(builder, TinkerTokenCompleter(sampler, cfg.max_tokens, cfg.temperature))


async def run_sync(tc: Any, batches: list[list[Any]], cfg: RLBenchConfig, counter: list[int]) -> ModeResult:
    sampler = await tc.save_weights_and_get_sampling_client_async()
    counter[0] = 0
    busy, ends, rewards = 0.0, [], []
    t0 = time.perf_counter()
    for batch in batches:
        groups = list(await asyncio.gather(*[_rollout(b, sampler, cfg) for b in batch]))
        t_train = time.perf_counter()
        sampler = await _train(tc, groups, cfg)
        busy += time.perf_counter() - t_train
        ends.append(time.perf_counter() - t0)
        rewards.append(_mean_reward(groups))
        _progress("sync", len(ends), cfg.steps, ends[-1])
    wall = time.perf_counter() - t0
    rollouts = cfg.steps * cfg.groups_per_batch * cfg.group_size
    return ModeResult(
        "sync",
        cfg.steps,
        wall,
        busy,
        rollouts,
        counter[0],
        ends,
        rewards,
        {0: len(batches) * len(batches[0])},
    )


async def run_async(tc: Any, batches: list[list[Any]], cfg: RLBenchConfig, counter: list[int]) -> ModeResult:
    k = cfg.max_steps_off_policy
    state: dict[str, Any] = {"version": 0, "sampler": await tc.save_weights_and_get_sampling_client_async()}
    published = asyncio.Condition()
    done: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    counter[0] = 0

    async def worker(j: int, builder: Any) -> None:
        async with published:  # batch j may be sampled once the trainer is within K steps of it
            await published.wait_for(lambda: state["version"] >= j - k)
            version, sampler = state["version"], state["sampler"]
        done.put_nowait((version, await _rollout(builder, sampler, cfg)))

    t0 = time.perf_counter()
    workers = [asyncio.create_task(worker(j, b)) for j, batch in enumerate(batches) for b in batch]
    busy, ends, rewards = 0.0, [], []
    staleness: collections.Counter[int] = collections.Counter()
    try:
        for step in range(cfg.steps):
            taken = [await done.get() for _ in range(cfg.groups_per_batch)]
            staleness.update(step - v for v, _ in taken)
            groups = [g for _, g in taken]
            t_train = time.perf_counter()
            sampler = await _train(tc, groups, cfg)
            busy += time.perf_counter() - t_train
            async with published:
                state["version"], state["sampler"] = step + 1, sampler
                published.notify_all()
            ends.append(time.perf_counter() - t0)
            rewards.append(_mean_reward(groups))
            _progress("async", step + 1, cfg.steps, ends[-1])
    finally:
        for w in workers:
            w.cancel()
    wall = time.perf_counter() - t0
    rollouts = cfg.steps * cfg.groups_per_batch * cfg.group_size
    return ModeResult(
        "async", cfg.steps, wall, busy, rollouts, counter[0], ends, rewards, dict(sorted(staleness.items()))
    )


# ---------------------------------------------------------------------------------------------------------------
# Server and entry point.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_subprocess(
    model: str, env: dict[str, str], timeout_s: float = 600.0, extra_args: Sequence[str] = ()
) -> Iterator[str]:
    """`treadle serve` on a free port in a temporary data dir; yields its base URL."""
    import httpx

    with tempfile.TemporaryDirectory(prefix="treadle-bench-rl-") as data_dir:
        port = _free_port()
        cmd = [sys.executable, "-m", "treadle.cli", "serve", "--port", str(port), "--model", model]
        cmd += ["--data-dir", data_dir, "--api-key", API_KEY, *extra_args]
        log_path = os.path.join(data_dir, "server.log")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            url = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + timeout_s
                while True:
                    if proc.poll() is not None:
                        raise RuntimeError(f"treadle serve exited with {proc.returncode}: see {log_path}")
                    with contextlib.suppress(httpx.HTTPError):
                        if httpx.get(f"{url}/api/v1/healthz", timeout=1).status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"treadle serve did not become healthy in {timeout_s:.0f} s")
                    time.sleep(0.3)
                yield url
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


async def _run_modes(url: str, model: str, cfg: RLBenchConfig) -> list[ModeResult]:
    import tinker
    from tinker_cookbook import renderers

    service = tinker.ServiceClient(base_url=url, api_key=API_KEY)
    results = []
    for mode in ("sync", "async"):
        tc = await service.create_lora_training_client_async(base_model=model, rank=cfg.lora_rank)
        renderer = renderers.get_renderer(cfg.renderer, tokenizer=tc.get_tokenizer())
        counter = [0]
        batches = _batches(cfg, renderer, counter)
        run = run_sync if mode == "sync" else run_async
        results.append(await run(tc, batches, cfg, counter))
    return results


def run_bench(model: str, cfg: RLBenchConfig, serve_args: Sequence[str] = ()) -> list[ModeResult]:
    """Start a server (`treadle serve MODEL *serve_args`), run both modes against it, stop it."""
    server_env = {**os.environ, "TINKER_TELEMETRY": "0"}
    limit_client_threads()  # after copying the environment: the server keeps its own thread count
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    with serve_subprocess(model, server_env, extra_args=serve_args) as url, warnings.catch_warnings():
        # the cookbook 0.5.8 calls the SDK's *_async methods, which tinker 0.38 marks deprecated on every call
        warnings.simplefilter("ignore", FutureWarning)
        return asyncio.run(_run_modes(url, model, cfg))


def format_results(results: Sequence[ModeResult], cfg: RLBenchConfig) -> str:
    lines = [
        f"env {cfg.env}: {cfg.groups_per_batch} groups × {cfg.group_size} rollouts per step, {cfg.steps} steps, "
        f"{cfg.tool_calls_per_step} tool call(s) per env step at {cfg.tool_latency_s * 1000:.0f} ms, "
        f"max_tokens {cfg.max_tokens}, async K = {cfg.max_steps_off_policy}",
        f"{'mode':6} {'s/step':>8} {'steady':>8} {'rollouts/s':>11} {'trainer idle':>13} {'tool calls':>11} "
        f"{'mean reward':>12}  staleness histogram",
    ]
    for r in results:
        hist = " ".join(f"{s}:{n}" for s, n in r.staleness.items())
        lines.append(
            f"{r.mode:6} {r.s_per_step:8.2f} {r.steady_s_per_step:8.2f} {r.rollouts_per_s:11.2f} "
            f"{r.idle_fraction:12.0%} {r.tool_calls:11d} {r.mean_reward:12.3f}  {hist}"
        )
    if len(results) == 2:
        sync, async_ = results
        lines.append(
            f"async vs sync: {sync.s_per_step / async_.s_per_step:.2f}x per step over the whole run, "
            f"{sync.steady_s_per_step / async_.steady_s_per_step:.2f}x once the pipeline is full (steady)"
        )
    for r in results:
        lines.append(f"{r.mode} reward per step: " + " ".join(f"{x:.2f}" for x in r.reward_per_step))
    return "\n".join(lines)


def bench_rl(model: str, *, quick: bool = False) -> tuple[list[Any], dict[str, Any]]:
    """Registered as `treadle bench rl` (treadle/bench/registry.py).

    Two tool settings in one run, each sync vs async on a fresh adapter: one 200 ms call per env step, and a
    ReAct-style turn of four sequential 200 ms calls. Async gains `(R + T) / max(T, (R + T) / (K + 1))` for
    rollout time R and training time T, so it reaches 2x only where the tools make R at least T."""
    from treadle.bench.runner import Row

    base = RLBenchConfig(steps=3) if quick else RLBenchConfig()
    react = dataclasses.replace(base, tool_calls_per_step=4)
    # The third setting gives rollouts their own compute: two Ray replicas of the model (one core each here);
    # the run trains on one while its snapshots' rollouts go to the replica that is not training.
    settings = [(base, ()), (react, ()), (react, ("--ray", "--replicas", "2"))]
    rows, modes = [], []
    for cfg, serve_args in settings:
        sync, async_ = run_bench(model, cfg, serve_args)
        where = ", 2 Ray replicas" if serve_args else ""
        print(f"server: treadle serve {' '.join(serve_args) or '(one worker process)'}")
        print(format_results([sync, async_], cfg))
        tools = f"{cfg.tool_calls_per_step} x {cfg.tool_latency_s * 1000:.0f} ms tool calls/step{where}"
        rows += [
            Row(
                f"RL steps/min, async vs sync, whole run ({tools})",
                60 / async_.s_per_step,
                60 / sync.s_per_step,
                "steps/min",
                2.0,
            ),
            Row(
                f"RL steps/min, async vs sync, steady state ({tools})",
                60 / async_.steady_s_per_step,
                60 / sync.steady_s_per_step,
                "steps/min",
                2.0,
            ),
            Row(
                f"RL rollouts/s, async vs sync ({tools})",
                async_.rollouts_per_s,
                sync.rollouts_per_s,
                "rollouts/s",
                2.0,
            ),
            Row(
                f"trainer busy fraction, async vs sync ({tools})",
                100 * (1 - async_.idle_fraction),
                100 * (1 - sync.idle_fraction),
                "% busy",
                1.0,
            ),
        ]
        modes.append(
            {
                "config": dataclasses.asdict(cfg),
                "serve_args": list(serve_args),
                "modes": [sync.summary(), async_.summary()],
            }
        )
    return rows, {"runs": modes}
