"""The learner's state file: stream cursor, what each model path was trained from, live-reward tallies, and
every decision with its numbers (what `treadle learn status` prints).

Written atomically (temporary file + rename) after every change, so a crash leaves the previous state and a
restarted learner resumes from its cursor without training on a trace twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

Numbers = dict[str, float | int | str | None]


@dataclasses.dataclass
class Decision:
    cycle: int
    kind: str  # start | promote | reject | rollback | keep | skip | error
    reason: str
    numbers: Numbers = dataclasses.field(default_factory=dict)
    version: int | None = None  # the deployment version this decision produced or judged
    model_path: str | None = None
    time: float = dataclasses.field(default_factory=time.time)


@dataclasses.dataclass
class ModelInfo:
    """A model path the learner trained (or started from)."""

    step: int  # optimizer steps behind these weights
    state_path: str | None  # tinker://…/weights/NAME to resume training from (None: the bare base model)
    gate: float | None  # gate score (mean token log-prob on the gate set), if measured


@dataclasses.dataclass
class Watch:
    """A promotion on probation: rolled back if its live reward falls below the previous version's."""

    version: int
    previous_version: int
    previous_model_path: str


@dataclasses.dataclass
class LearnState:
    deployment: str
    cursor: int = 0  # every trace with seq <= cursor was used or given up
    consumed: list[int] = dataclasses.field(default_factory=list)  # used seqs above the cursor
    step: int = 0  # optimizer steps behind the weights the learner trains now
    cycle: int = 0
    models: dict[str, ModelInfo] = dataclasses.field(default_factory=dict)
    reward_stats: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # version → [n, sum]
    watch: Watch | None = None
    decisions: list[Decision] = dataclasses.field(default_factory=list)

    def log(self, decision: Decision) -> Decision:
        self.decisions.append(decision)
        return decision

    def add_reward(self, version: int, reward: float) -> None:
        n, total = self.reward_stats.get(str(version), [0.0, 0.0])
        self.reward_stats[str(version)] = [n + 1, total + reward]

    def mean_reward(self, version: int) -> tuple[int, float | None]:
        n, total = self.reward_stats.get(str(version), [0.0, 0.0])
        return int(n), (total / n if n else None)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LearnState:
        watch = d.get("watch")
        return cls(
            deployment=str(d["deployment"]),
            cursor=int(d.get("cursor", 0)),
            consumed=[int(x) for x in d.get("consumed", [])],
            step=int(d.get("step", 0)),
            cycle=int(d.get("cycle", 0)),
            models={k: ModelInfo(**v) for k, v in d.get("models", {}).items()},
            reward_stats={k: [float(x) for x in v] for k, v in d.get("reward_stats", {}).items()},
            watch=Watch(**watch) if watch else None,
            decisions=[Decision(**x) for x in d.get("decisions", [])],
        )


def load_state(path: Path, deployment: str) -> LearnState:
    if not path.exists():
        return LearnState(deployment=deployment)
    state = LearnState.from_json(json.loads(path.read_text()))
    if state.deployment != deployment:
        raise ValueError(f"state file {path} belongs to deployment {state.deployment!r}, not {deployment!r}")
    return state


def save_state(path: Path, state: LearnState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(state.to_json(), f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fmt(v: float | int | str | None) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def format_status(state: LearnState, last: int = 50) -> str:
    """A table of the latest decisions, then the live-reward tallies per version."""
    lines = [
        f"deployment {state.deployment}: cycle {state.cycle}, {state.step} optimizer steps, cursor {state.cursor}"
    ]
    if state.watch:
        w = state.watch
        lines.append(f"on probation: version {w.version} (previous {w.previous_version})")
    lines.append("")
    lines.append(f"{'when (UTC)':19}  {'cycle':>5}  {'decision':8}  {'version':>7}  numbers / reason")
    for d in state.decisions[-last:]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(d.time))
        nums = " ".join(f"{k}={_fmt(v)}" for k, v in d.numbers.items())
        ver = "" if d.version is None else str(d.version)
        lines.append(f"{when:19}  {d.cycle:>5}  {d.kind:8}  {ver:>7}  {nums}  {d.reason}".rstrip())
    if state.reward_stats:
        lines.append("")
        lines.append(
            "live reward by version: "
            + ", ".join(
                f"v{v}: {s[1] / s[0]:.3f} (n={int(s[0])})"
                for v, s in sorted(state.reward_stats.items(), key=lambda kv: int(kv[0]))
                if s[0]
            )
        )
    return "\n".join(lines)
