"""Run N independent trials of every task in an RL dataset split through a policy and count successes.

A task is one `EnvGroupBuilder` of the split. Its trials are rollouts of fresh envs from that builder, run with
the cookbook's own `do_group_rollout` (so group rewards, cleanup and stop reasons are exactly what training
sees); the builder is asked for as many groups as it takes to reach N trials. Trials are independent because
every `sample` call draws its own randomness on the server.

Success of one trial: the env's own verdict when its last step reports one (a `success`, `correct` or `solved`
metric), else total reward (step rewards + group reward) within 1e-6 of at least `reward_threshold` — τ-bench's
rule for reward-1 tasks. A rollout that raises (a crashed tool, a sampler error) is a failed trial and counted in
`errors`, never a crash of the evaluation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Sequence

from tinker_cookbook.completers import TokenCompleter
from tinker_cookbook.rl.rollouts import do_group_rollout
from tinker_cookbook.rl.types import EnvGroupBuilder, Trajectory, TrajectoryGroup

from treadle.rl.evaluation.estimators import TaskOutcome

SUCCESS_METRICS = ("success", "correct", "solved")


@dataclasses.dataclass(frozen=True)
class Trial:
    """One rollout of one task."""

    reward: float
    success: bool
    stop_reason: str | None
    error: str | None = None


@dataclasses.dataclass
class TaskTrials:
    task_id: str
    trials: list[Trial]

    def outcome(self) -> TaskOutcome:
        return TaskOutcome(self.task_id, n=len(self.trials), c=sum(t.success for t in self.trials))


def trial_success(
    traj: Trajectory, total_reward: float, group_metrics: dict[str, float], threshold: float
) -> bool:
    """The env's verdict if it gives one, else the reward threshold (see the module docstring)."""
    last = traj.transitions[-1].metrics if traj.transitions else {}
    for key in SUCCESS_METRICS:
        for metrics in (group_metrics, last):
            if key in metrics:
                return float(metrics[key]) > 0.5
    return total_reward >= threshold - 1e-6


def _trials_of_group(group: TrajectoryGroup, threshold: float) -> list[Trial]:
    out = []
    totals = group.get_total_rewards()
    for traj, total, metrics in zip(group.trajectories_G, totals, group.metrics_G, strict=True):
        stop = getattr(traj, "stop_reason", None)
        out.append(
            Trial(
                reward=float(total),
                success=trial_success(traj, float(total), dict(metrics), threshold),
                stop_reason=None if stop is None else str(getattr(stop, "value", stop)),
            )
        )
    # Rollouts an error-tolerant strategy dropped are failed trials, not missing ones.
    for err in group.rollout_errors:
        out.append(Trial(reward=0.0, success=False, stop_reason="error", error=str(err)))
    return out


async def _one_group(
    builder: EnvGroupBuilder, policy: TokenCompleter, threshold: float, size: int, sem: asyncio.Semaphore
) -> list[Trial]:
    async with sem:
        try:
            group = await do_group_rollout(builder, policy)
        except Exception as e:  # noqa: BLE001 - a failed rollout is a failed trial, never a failed evaluation
            failed = Trial(reward=0.0, success=False, stop_reason="error", error=f"{type(e).__name__}: {e}")
            return [failed] * size
    return _trials_of_group(group, threshold)


async def _group_size(builder: EnvGroupBuilder) -> int:
    """How many envs one `make_envs()` of this builder yields (the cookbook's builders say; others are asked)."""
    known = getattr(builder, "num_envs", None) or getattr(builder, "group_size", None)
    if isinstance(known, int) and known > 0:
        return known
    envs = await builder.make_envs()
    await builder.cleanup()
    return max(1, len(envs))


def task_id_of(builder: EnvGroupBuilder, index: int) -> str:
    tags = builder.logging_tags()
    return f"{index}" + (f":{'/'.join(tags)}" if tags else "")


async def run_trials(
    builders: Sequence[EnvGroupBuilder],
    policy: TokenCompleter,
    *,
    trials: int,
    reward_threshold: float = 1.0,
    concurrency: int = 16,
) -> list[TaskTrials]:
    """`trials` rollouts of every task (builder), at most `concurrency` groups in flight."""
    if trials < 1:
        raise ValueError(f"trials must be >= 1, got {trials}")
    if not builders:
        raise ValueError("the split has no tasks to evaluate")
    sem = asyncio.Semaphore(max(1, concurrency))

    async def task(builder: EnvGroupBuilder) -> list[Trial]:
        size = await _group_size(builder)
        calls = math.ceil(trials / size)
        parts = await asyncio.gather(
            *[_one_group(builder, policy, reward_threshold, size, sem) for _ in range(calls)]
        )
        flat = [t for part in parts for t in part]
        if len(flat) < trials:  # a builder that made fewer envs than it announced
            raise RuntimeError(
                f"task builder {type(builder).__name__} produced {len(flat)} of {trials} trials"
            )
        return flat[:trials]

    results = await asyncio.gather(*[task(b) for b in builders])
    return [TaskTrials(task_id_of(b, i), r) for i, (b, r) in enumerate(zip(builders, results, strict=True))]
