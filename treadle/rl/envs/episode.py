"""A turn-based cookbook `MessageEnv` base: turn/tool budgets, episode wall clock, recorded stop reasons.

Subclasses implement `respond(text)` for one assistant turn. Anything a tool raises ends that episode with the
stop reason `tool_error` and zero reward for the turn (the training run goes on), never an exception out of
`step` — a sandbox that cannot start is one bad rollout, not a crashed trainer.
"""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from dataclasses import dataclass, field

from tinker_cookbook.renderers import Message, get_text_content
from tinker_cookbook.rl.message_env import MessageEnv, MessageStepResult
from tinker_cookbook.rl.types import STOP_METRIC_PREFIX, StopReason

from treadle.rl.envs.spec import EnvLimits

logger = logging.getLogger(__name__)

# Stop reasons beyond the cookbook's StopReason enum (recorded the same way, as one-hot `stop/<reason>`).
TOOL_ERROR = "tool_error"


@dataclass
class Turn:
    """What one assistant turn did: reward, the env's reply (None = no reply), whether it ended the episode."""

    reward: float
    reply: str | None
    done: bool = False
    stop_reason: str | None = None
    tool_calls: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


class TurnEnv(MessageEnv):
    """One episode of a text game: system + user prompt, then assistant turns answered by `respond`."""

    def __init__(
        self, system_prompt: str, user_prompt: str, limits: EnvLimits, demo: list[Message] | None = None
    ) -> None:
        self.limits = limits
        # `demo`: a solved example episode shown before the task (the `demo=1` curriculum aid for small models)
        self.messages: list[Message] = [
            {"role": "system", "content": system_prompt},
            *(demo or []),
            {"role": "user", "content": user_prompt},
        ]
        self.turns = 0
        self.tool_calls = 0
        self.total_reward = 0.0
        self.stop_reason: str | None = None
        self._start = time.monotonic()

    async def initial_observation(self) -> list[Message]:
        self._start = time.monotonic()
        return list(self.messages)

    @abstractmethod
    async def respond(self, text: str) -> Turn:
        """Act on the assistant's text for this turn."""

    async def close(self) -> None:
        """Release what the episode holds (a sandbox); called when it ends and by the group's cleanup."""
        return None

    async def step(self, message: Message) -> MessageStepResult:
        text = get_text_content(message)
        self.turns += 1
        self.messages.append({"role": "assistant", "content": text})
        if time.monotonic() - self._start > self.limits.episode_timeout_s:
            turn = Turn(reward=0.0, reply=None, done=True, stop_reason=StopReason.ROLLOUT_TIMEOUT)
        else:
            try:
                turn = await self.respond(text)
            except Exception as e:  # noqa: BLE001 - a tool failure ends this rollout, not the run
                logger.warning("%s: tool failed, episode ends: %s", type(self).__name__, e)
                turn = Turn(
                    reward=0.0,
                    reply=f"Tool error: {type(e).__name__}: {e}",
                    done=True,
                    stop_reason=TOOL_ERROR,
                )
        self.tool_calls += turn.tool_calls
        if not turn.done and self.turns >= self.limits.max_turns:
            turn.done, turn.stop_reason = True, StopReason.MAX_TURNS
        if turn.done and turn.stop_reason is None:
            turn.stop_reason = StopReason.COMPLETED
        if turn.reply is not None:
            self.messages.append({"role": "user", "content": turn.reply})
        self.total_reward += turn.reward
        metrics = dict(turn.metrics)
        if turn.done:
            await self.close()
            self.stop_reason = turn.stop_reason
            metrics[f"{STOP_METRIC_PREFIX}{turn.stop_reason}"] = 1.0
            metrics["turns"] = float(self.turns)
            metrics["tool_calls"] = float(self.tool_calls)
        return MessageStepResult(
            reward=turn.reward,
            episode_done=turn.done,
            next_messages=list(self.messages),
            metrics=metrics,
            logs={"action": text[:500], "reply": (turn.reply or "")[:500]},
        )
