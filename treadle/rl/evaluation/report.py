"""An evaluation's result as a table on stdout, a JSON document and a PNG plot of pass^k and pass@k against k."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from treadle.rl.evaluation.estimators import Curve, TaskOutcome, curves


@dataclasses.dataclass
class EvalReport:
    """What `treadle rl eval` measured: per-task outcomes and the curves computed from them."""

    env: str
    model: str
    split: str
    trials: int
    outcomes: list[TaskOutcome]
    pass_hat: Curve
    pass_at: Curve
    mean_reward: float
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_outcomes(
        cls,
        *,
        env: str,
        model: str,
        split: str,
        trials: int,
        outcomes: Sequence[TaskOutcome],
        mean_reward: float,
        settings: dict[str, Any] | None = None,
        confidence: float = 0.95,
        seed: int = 0,
    ) -> EvalReport:
        pass_hat, pass_at = curves(outcomes, confidence=confidence, seed=seed)
        return cls(
            env=env,
            model=model,
            split=split,
            trials=trials,
            outcomes=list(outcomes),
            pass_hat=pass_hat,
            pass_at=pass_at,
            mean_reward=mean_reward,
            settings=dict(settings or {}),
        )

    @property
    def pass1(self) -> float:
        return self.pass_hat.mean[0]

    def table(self) -> str:
        lines = [
            f"env {self.env} · split {self.split} · model {self.model} · {len(self.outcomes)} tasks × "
            f"{self.trials} trials · mean reward {self.mean_reward:.3f}",
            f"{'k':>3}  {'pass^k':>7} {'95% CI':>15}   {'pass@k':>7} {'95% CI':>15}",
        ]
        for i, k in enumerate(self.pass_hat.ks):
            h, a = self.pass_hat, self.pass_at
            lines.append(
                f"{k:>3}  {h.mean[i]:7.3f} [{h.low[i]:6.3f},{h.high[i]:6.3f}]   "
                f"{a.mean[i]:7.3f} [{a.low[i]:6.3f},{a.high[i]:6.3f}]"
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "env": self.env,
            "model": self.model,
            "split": self.split,
            "trials": self.trials,
            "tasks": len(self.outcomes),
            "pass@1": self.pass1,
            "mean_reward": self.mean_reward,
            "pass^k": dataclasses.asdict(self.pass_hat),
            "pass@k": dataclasses.asdict(self.pass_at),
            "per_task": [dataclasses.asdict(o) for o in self.outcomes],
            "settings": self.settings,
        }

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        """Write `eval.json` and `passk.png` into out_dir; returns their paths."""
        out_dir.mkdir(parents=True, exist_ok=True)
        json_path = out_dir / "eval.json"
        json_path.write_text(json.dumps(self.to_json(), indent=2))
        png_path = out_dir / "passk.png"
        plot_curves(
            [self.pass_hat, self.pass_at], png_path, title=f"{self.env} ({self.split}) — {self.model}"
        )
        return json_path, png_path


def plot_curves(curves_: Sequence[Curve], path: Path, *, title: str) -> None:
    """Metric against k with its confidence band, one line per curve."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for c in curves_:
        ax.plot(c.ks, c.mean, marker="o", label=c.name)
        ax.fill_between(c.ks, c.low, c.high, alpha=0.2)
    ax.set_xlabel("k (trials)")
    ax.set_ylabel("mean over tasks")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(list(curves_[0].ks))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
