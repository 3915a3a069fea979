"""Pluggable reward functions: Trace → reward (None: no reward for this trace).

- `feedback`: the users' own `reward` (or `rating` ±1) from POST /v1/feedback.
- `rule:package.module:function`: any importable `function(trace) -> float | None`.
- `model:DEPLOYMENT`: a reward model that is itself a deployment on the same server, asked through the
  OpenAI chat route to score the exchange from 0 to 10 (mapped to [0, 1]).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

import httpx

from treadle.errors import UserError
from treadle.learn.batch import Trace, feedback_signal

RewardFn = Callable[[Trace], float | None]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

JUDGE_PROMPT = (
    "Rate how well the answer serves the user, from 0 (useless) to 10 (perfect). "
    "Reply with the number only.\n\nUser: {question}\n\nAnswer: {answer}"
)


def feedback_reward(trace: Trace) -> float | None:
    return feedback_signal(trace)[0]


def question_text(trace: Trace) -> str:
    """The last user message of a chat trace, or the prompt of a completions trace."""
    request: dict[str, Any] = trace.get("request") or {}
    for msg in reversed(request.get("messages") or []):
        if msg.get("role") == "user":
            content = msg.get("content")
            if isinstance(content, list):
                return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return str(content or "")
    prompt = request.get("prompt")
    return prompt if isinstance(prompt, str) else ""


def parse_score(text: str, top: float = 10.0) -> float | None:
    """The first number in a judge's reply, clipped to [0, top] and scaled to [0, 1]; None if there is none."""
    m = _NUMBER.search(text)
    if m is None:
        return None
    return min(max(float(m.group(0)), 0.0), top) / top


class RewardModel:
    """Scores traces with a deployed judge model through `/v1/chat/completions` (greedy, short reply)."""

    def __init__(self, base_url: str, api_key: str, deployment: str, timeout_s: float = 120.0) -> None:
        self.deployment = deployment
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout_s
        )

    def __call__(self, trace: Trace) -> float | None:
        prompt = JUDGE_PROMPT.format(question=question_text(trace), answer=trace.get("completion_text", ""))
        resp = self._http.post(
            "/v1/chat/completions",
            json={
                "model": self.deployment,
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0.0,
                "max_tokens": 8,
            },
        )
        if resp.status_code >= 400:
            raise UserError(
                f"reward: the reward model deployment {self.deployment!r} answered HTTP {resp.status_code}: "
                f"{resp.text[:300]}",
                field="reward",
            )
        return parse_score(str(resp.json()["choices"][0]["message"].get("content") or ""))


def load_rule(spec: str) -> RewardFn:
    """`rule:package.module:function` → that function."""
    _, module_name, attr = spec.split(":", 2)
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"reward: cannot load {module_name}:{attr}: {e}", field="reward") from None
    if not callable(fn):
        raise UserError(f"reward: {module_name}:{attr} is not callable", field="reward")

    def reward(trace: Trace) -> float | None:
        value: Any = fn(trace)
        return None if value is None else float(value)

    return reward


def make_reward_fn(spec: str, base_url: str, api_key: str) -> RewardFn:
    if spec == "feedback":
        return feedback_reward
    if spec.startswith("rule:"):
        return load_rule(spec)
    if spec.startswith("model:"):
        return RewardModel(base_url, api_key, spec.split(":", 1)[1])
    raise UserError(f"reward: unknown reward {spec!r}", field="reward")
