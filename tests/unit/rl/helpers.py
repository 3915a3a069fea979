"""Play scripted assistant turns against an env's cookbook MessageEnv (no model, no server)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from tinker_cookbook.rl.message_env import MessageEnv, MessageStepResult


def play(env: MessageEnv, policy: Callable[[list[Any]], str] | Sequence[str]) -> list[MessageStepResult]:
    """Run one episode: `policy(messages) -> text` (or a fixed list of texts) until the env says done."""

    async def run() -> list[MessageStepResult]:
        messages = await env.initial_observation()
        results: list[MessageStepResult] = []
        for i in range(1000):
            text = policy(messages) if callable(policy) else policy[min(i, len(policy) - 1)]
            result = await env.step({"role": "assistant", "content": text})
            results.append(result)
            messages = result.next_messages
            if result.episode_done:
                return results
        raise AssertionError("episode never ended")

    return asyncio.run(run())


def total(results: list[MessageStepResult]) -> float:
    return sum(r.reward for r in results)


def stop_reason(results: list[MessageStepResult]) -> str:
    reasons = [k.removeprefix("stop/") for k in results[-1].metrics if k.startswith("stop/")]
    assert len(reasons) == 1, results[-1].metrics
    return reasons[0]
