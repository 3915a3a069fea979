"""Any registered env as cookbook RL data: an `EnvGroupBuilder` per task, an `RLDataset`, an `RLDatasetBuilder`.

The group builder keeps only picklable fields (env name, task, config, renderer from `get_renderer`) and builds
its envs in `make_envs`, as the cookbook asks, so rollouts can also run in a process pool.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import chz
from tinker_cookbook.renderers import Renderer, get_renderer
from tinker_cookbook.rl.message_env import EnvFromMessageEnv
from tinker_cookbook.rl.types import Env, EnvGroupBuilder, RLDataset, RLDatasetBuilder
from tinker_cookbook.tokenizer_utils import get_tokenizer

from treadle.rl.envs.episode import TurnEnv
from treadle.rl.envs.registry import get_env

logger = logging.getLogger(__name__)

# A turn that stops unparsed (no end-of-turn token) or runs past the context budget ends the episode with this
# reward: the same as a wrong answer, so truncation is never a way to dodge a negative grade.
FAILED_PARSE_REWARD = 0.0
CONTEXT_OVERFLOW_REWARD = 0.0


class _EventLoopRenderEnv(EnvFromMessageEnv):
    """The cookbook renders each prompt in a worker thread; every env of a run shares one Hugging Face fast
    tokenizer, which raises `RuntimeError: Already borrowed` when two threads use it at once (seen with 16
    concurrent rollouts). Rendering on the event loop keeps all tokenizer use on one thread; it is cheap."""

    async def _render_in_thread(self, messages: Any, **kwargs: Any) -> Any:
        return self.renderer.build_generation_prompt(messages, **kwargs)


@dataclass(frozen=True)
class TaskGroupBuilder(EnvGroupBuilder):
    """`group_size` rollouts of one task (GRPO centres rewards within the group)."""

    env_name: str
    task: Any
    config: tuple[tuple[str, Any], ...]
    renderer: Renderer
    group_size: int
    split: str
    # > 0 replaces the env's wall-clock limit per episode (a training setting, not part of the task)
    episode_timeout_s: float = 0.0

    async def make_envs(self) -> Sequence[Env]:
        spec = get_env(self.env_name)
        config = dict(self.config)
        message_envs = [spec.make_env(self.task, config) for _ in range(self.group_size)]
        if self.episode_timeout_s > 0:
            for env in message_envs:
                if isinstance(env, TurnEnv):
                    env.limits = replace(env.limits, episode_timeout_s=self.episode_timeout_s)
        # kept (outside the dataclass fields) so cleanup() can close episodes the cookbook ended early
        object.__setattr__(self, "_made", [*getattr(self, "_made", []), *message_envs])
        return [
            _EventLoopRenderEnv(
                renderer=self.renderer,
                message_env=message_env,
                failed_parse_reward=FAILED_PARSE_REWARD,
                context_overflow_reward=CONTEXT_OVERFLOW_REWARD,
                max_trajectory_tokens=spec.limits.max_trajectory_tokens,
                max_generation_tokens=spec.limits.max_tokens_per_turn,
            )
            for message_env in message_envs
        ]

    async def cleanup(self) -> None:
        for env in getattr(self, "_made", []):
            close = getattr(env, "close", None)
            if close is not None:
                try:
                    await close()
                except Exception:  # noqa: BLE001 - the cookbook asks cleanup never to raise
                    logger.exception("closing an env failed")
        object.__setattr__(self, "_made", [])

    def logging_tags(self) -> list[str]:
        return [self.env_name, f"{self.env_name}/{self.split}"]


@dataclass(frozen=True)
class TaskDataset(RLDataset):
    """Batches of `batch_size` task groups; the train split is shuffled once with `seed`."""

    builders: tuple[TaskGroupBuilder, ...]
    batch_size: int

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        start = index * self.batch_size
        return list(self.builders[start : start + self.batch_size])

    def __len__(self) -> int:
        return math.ceil(len(self.builders) / self.batch_size)


def build_split(
    env_name: str,
    split: str,
    env_config: dict[str, Any],
    renderer: Renderer,
    group_size: int,
    batch_size: int,
    seed: int = 0,
    max_tasks: int | None = None,
    episode_timeout_s: float = 0.0,
) -> TaskDataset:
    spec = get_env(env_name)
    config = spec.resolve_config(env_config)
    tasks = list(spec.make_tasks(split, config))
    if split == "train":
        random.Random(seed).shuffle(tasks)
    if max_tasks is not None:
        tasks = tasks[:max_tasks]
    frozen = tuple(sorted(config.items()))
    builders = tuple(
        TaskGroupBuilder(env_name, t, frozen, renderer, group_size, split, episode_timeout_s) for t in tasks
    )
    return TaskDataset(builders, batch_size)


@chz.chz
class TreadleEnvDatasetBuilder(RLDatasetBuilder):
    """Train and test datasets for a registered env (`env_config` holds its keys, e.g. `level`)."""

    env_name: str
    model_name: str
    renderer_name: str
    batch_size: int = 8
    group_size: int = 4
    test_group_size: int = 1
    test_tasks: int = 32
    seed: int = 0
    env_config: dict[str, Any] = chz.field(default_factory=dict)
    episode_timeout_s: float = 0.0

    async def __call__(self) -> tuple[RLDataset, RLDataset | None]:
        renderer = get_renderer(self.renderer_name, get_tokenizer(self.model_name))
        train = build_split(
            self.env_name,
            "train",
            self.env_config,
            renderer,
            self.group_size,
            self.batch_size,
            self.seed,
            episode_timeout_s=self.episode_timeout_s,
        )
        test = build_split(
            self.env_name,
            "test",
            self.env_config,
            renderer,
            self.test_group_size,
            self.test_tasks,
            max_tasks=self.test_tasks,
            episode_timeout_s=self.episode_timeout_s,
        )
        return train, test
