"""`treadle rl train ENV key=value ...` as a library call: validated keys -> the cookbook's `rl.train.Config`.

Training keys (below) and the env's own keys (its manifest's `config`) share one namespace; an unknown key or
a bad value is a `ValueError` naming the key and what is allowed. Training itself is the cookbook's
`rl.train.main`, unmodified.
"""

from __future__ import annotations

import os
import time
from typing import Any

from treadle.rl.envs.spec import ConfigKey

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_RENDERER = "qwen3_instruct"  # ChatML without thinking tags = SmolLM2's own template

TRAIN_KEYS: tuple[ConfigKey, ...] = (
    ConfigKey("model_name", DEFAULT_MODEL, "base model served by the Tinker server"),
    ConfigKey("renderer_name", DEFAULT_RENDERER, "cookbook renderer"),
    ConfigKey("base_url", "", "Tinker server URL (default: $TINKER_BASE_URL)"),
    ConfigKey("log_path", "", "run directory (default: runs/rl-ENV-TIME)"),
    ConfigKey("learning_rate", 1e-4, "Adam learning rate", minimum=0.0, maximum=1.0),
    ConfigKey("max_steps", 20, "training steps", minimum=1),
    ConfigKey("group_size", 4, "rollouts per task (GRPO group)", minimum=1),
    ConfigKey("groups_per_batch", 8, "tasks per training step", minimum=1),
    ConfigKey("lora_rank", 16, "LoRA rank", minimum=1, maximum=256),
    ConfigKey(
        "loss_fn",
        "importance_sampling",
        "policy loss",
        choices=("importance_sampling", "ppo", "cispo", "dro"),
    ),
    ConfigKey("temperature", 1.0, "sampling temperature", minimum=0.0, maximum=2.0),
    ConfigKey("max_tokens", 0, "tokens per turn (0 = the env's limit)", minimum=0),
    ConfigKey("eval_every", 0, "test-split eval cadence in steps (0 = off)", minimum=0),
    ConfigKey("save_every", 0, "checkpoint cadence in steps (0 = only the final one)", minimum=0),
    ConfigKey("test_tasks", 32, "test-split tasks per evaluation", minimum=1),
    ConfigKey(
        "episode_timeout_s",
        0.0,
        "wall-clock seconds per episode (0 = the env's limit; raise it when the server is slow or shared)",
        minimum=0.0,
    ),
    ConfigKey("max_steps_off_policy", 0, "async RL: sampler staleness bound (0 = synchronous)", minimum=0),
)


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """`key=value` strings -> dict; a pair without `=` or a repeated key is an error."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {pair!r}")
        if key in out:
            raise ValueError(f"config key {key!r} given twice")
        out[key] = value
    return out


def resolve_train_config(env_name: str, overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(training settings, env config), each checked; unknown keys are an error listing every allowed key."""
    from treadle.rl.envs.registry import get_env

    spec = get_env(env_name)
    train_keys = {k.name: k for k in TRAIN_KEYS}
    env_keys = {k.name: k for k in spec.config_keys}
    unknown = sorted(set(overrides) - set(train_keys) - set(env_keys))
    if unknown:
        allowed = ", ".join(sorted(set(train_keys) | set(env_keys)))
        raise ValueError(f"unknown config key {unknown[0]!r} for `rl train {env_name}`; allowed: {allowed}")
    settings = {k.name: k.default for k in TRAIN_KEYS}
    for name, raw in overrides.items():
        if name in train_keys:
            settings[name] = train_keys[name].parse(raw)
    env_config = spec.resolve_config({k: v for k, v in overrides.items() if k in env_keys})
    if not settings["max_tokens"]:
        settings["max_tokens"] = spec.limits.max_tokens_per_turn
    if not settings["log_path"]:
        settings["log_path"] = os.path.join("runs", f"rl-{env_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return settings, env_config


def build_config(env_name: str, overrides: dict[str, Any]) -> Any:
    """The cookbook `rl.train.Config` for this env and these keys."""
    from tinker_cookbook.rl import train

    from treadle.rl.envs.dataset import TreadleEnvDatasetBuilder

    settings, env_config = resolve_train_config(env_name, overrides)
    dataset = TreadleEnvDatasetBuilder(
        env_name=env_name,
        model_name=settings["model_name"],
        renderer_name=settings["renderer_name"],
        batch_size=settings["groups_per_batch"],
        group_size=settings["group_size"],
        test_tasks=settings["test_tasks"],
        seed=int(env_config.get("seed", 0)),
        env_config=env_config,
        episode_timeout_s=settings["episode_timeout_s"],
    )
    async_config = None
    if settings["max_steps_off_policy"]:
        async_config = train.AsyncConfig(
            max_steps_off_policy=settings["max_steps_off_policy"],
            groups_per_batch=settings["groups_per_batch"],
        )
    return train.Config(
        learning_rate=settings["learning_rate"],
        dataset_builder=dataset,
        model_name=settings["model_name"],
        recipe_name=f"treadle_rl_{env_name}",
        renderer_name=settings["renderer_name"],
        max_tokens=settings["max_tokens"],
        log_path=settings["log_path"],
        eval_every=settings["eval_every"],
        save_every=settings["save_every"],
        lora_rank=settings["lora_rank"],
        loss_fn=settings["loss_fn"],
        temperature=settings["temperature"],
        base_url=settings["base_url"] or None,
        max_steps=settings["max_steps"],
        async_config=async_config,
        # a rollout that raises is retried with a fresh env; a group that keeps failing is dropped, the run goes on
        rollout_error_tolerance=True,
    )
