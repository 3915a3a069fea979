"""The learner's typed configuration, filled from `key=value` words on the command line.

Every key is a field of `LearnConfig`; an unknown key or a value of the wrong type is refused with a message
naming the key and what is allowed, before anything talks to the server.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, get_type_hints

from treadle.errors import UserError

LOSSES = ("importance_sampling", "ppo")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _default_base_url() -> str:
    return os.environ.get("TINKER_BASE_URL", "http://127.0.0.1:8000")


def _default_api_key() -> str:
    return os.environ.get("TINKER_API_KEY", "tml-local")


@dataclasses.dataclass
class LearnConfig:
    """One online learner for one deployment. Times are seconds; staleness counts optimizer steps."""

    deployment: str = ""
    base_url: str = dataclasses.field(default_factory=_default_base_url)
    api_key: str = dataclasses.field(default_factory=_default_api_key)
    # where decisions and the stream cursor are kept (default: <cache>/learn/<deployment>.json)
    state_file: str = ""
    # feedback | rule:package.module:function | model:<deployment name of a reward model>
    reward: str = "feedback"
    loss: str = "importance_sampling"
    learning_rate: float = 1e-4
    lora_rank: int = 16
    steps_per_cycle: int = 2
    use_rewards: bool = True
    use_corrections: bool = True
    # a cycle starts once this many traces carry a reward or a correction (capped at max_traces)
    min_traces: int = 16
    max_traces: int = 256
    poll_interval_s: float = 2.0
    # a served trace with no feedback after this long is given up on
    feedback_wait_s: float = 120.0
    # optimizer steps between the weights that served a trace and the weights being trained; older is dropped
    max_staleness: int = 8
    # JSONL of {"messages": [...], "completion": str}: candidates must keep its mean token log-prob
    gate_set: str = ""
    # nats per token a candidate may lose on the gate set against the live version and still be promoted
    gate_tolerance: float = 0.05
    # after a promotion, compare live mean reward with the previous version's once this many rewards arrived
    rollback_min_feedback: int = 8
    rollback_margin: float = 0.0
    # stop after this many cycles (0: run until interrupted)
    cycles: int = 0
    # stop waiting for traces after this long in one cycle (0: wait forever)
    cycle_timeout_s: float = 0.0
    # tinker://RUN/weights/NAME to train from when the live version is a checkpoint this learner did not make
    init_state: str = ""

    def resolved_state_file(self) -> Path:
        if self.state_file:
            return Path(self.state_file).expanduser()
        cache = os.environ.get("TREADLE_CACHE_DIR") or str(Path.home() / ".cache" / "treadle")
        return Path(cache) / "learn" / f"{self.deployment}.json"

    def validate(self) -> None:
        if not self.deployment:
            raise UserError("deployment: required (the deployment to learn for)", field="deployment")
        if self.loss not in LOSSES:
            raise UserError(f"loss: must be one of {', '.join(LOSSES)}, got {self.loss!r}", field="loss")
        if not (
            self.reward == "feedback"
            or (self.reward.startswith("rule:") and self.reward.count(":") == 2)
            or (self.reward.startswith("model:") and len(self.reward) > len("model:"))
        ):
            raise UserError(
                f"reward: must be 'feedback', 'rule:package.module:function' or 'model:DEPLOYMENT', "
                f"got {self.reward!r}",
                field="reward",
            )
        positive = {
            "learning_rate": self.learning_rate,
            "lora_rank": self.lora_rank,
            "steps_per_cycle": self.steps_per_cycle,
            "min_traces": self.min_traces,
            "max_traces": self.max_traces,
            "poll_interval_s": self.poll_interval_s,
            "rollback_min_feedback": self.rollback_min_feedback,
        }
        for key, value in positive.items():
            if not value > 0:
                raise UserError(f"{key}: must be > 0, got {value}", field=key)
        non_negative = {
            "feedback_wait_s": self.feedback_wait_s,
            "max_staleness": self.max_staleness,
            "gate_tolerance": self.gate_tolerance,
            "rollback_margin": self.rollback_margin,
            "cycles": self.cycles,
            "cycle_timeout_s": self.cycle_timeout_s,
        }
        for key, value in non_negative.items():
            if not value >= 0:
                raise UserError(f"{key}: must be >= 0, got {value}", field=key)
        if self.max_traces < self.min_traces:
            raise UserError(
                f"max_traces: must be >= min_traces ({self.min_traces}), got {self.max_traces}",
                field="max_traces",
            )
        if not (self.use_rewards or self.use_corrections):
            raise UserError(
                "use_rewards: at least one of use_rewards/use_corrections must be true", field="use_rewards"
            )
        if self.gate_set and not Path(self.gate_set).expanduser().is_file():
            raise UserError(f"gate_set: no such file {self.gate_set!r}", field="gate_set")
        if self.init_state and "/weights/" not in self.init_state:
            raise UserError(
                f"init_state: must be a training checkpoint tinker://RUN/weights/NAME, got {self.init_state!r}",
                field="init_state",
            )


def _convert(key: str, kind: Any, text: str) -> Any:
    if kind is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise UserError(f"{key}: expected true or false, got {text!r}", field=key)
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise UserError(f"{key}: expected {kind.__name__}, got {text!r}", field=key) from None
    return text


def parse_config(words: list[str], **fixed: Any) -> LearnConfig:
    """`["loss=ppo", "min_traces=8"]` (+ keyword fields such as deployment) → a validated LearnConfig."""
    hints = get_type_hints(LearnConfig)
    allowed = [f.name for f in dataclasses.fields(LearnConfig)]
    values: dict[str, Any] = {k: v for k, v in fixed.items() if v is not None}
    for word in words:
        key, sep, text = word.partition("=")
        if not sep:
            raise UserError(
                f"config: expected key=value, got {word!r} (keys: {', '.join(allowed)})", field="config"
            )
        if key not in hints:
            raise UserError(f"{key}: unknown config key; allowed: {', '.join(allowed)}", field=key)
        values[key] = _convert(key, hints[key], text)
    cfg = LearnConfig(**values)
    cfg.validate()
    return cfg
