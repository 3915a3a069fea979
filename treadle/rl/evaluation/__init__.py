"""Reliability evaluation for treadle.rl: pass@k and pass^k (τ-bench) over N trials per test task.

Light on purpose (numpy only): `treadle.rl.evaluation.cli` is imported when the CLI builds its parser. The trial
runner, which needs the cookbook, is `treadle.rl.evaluation.runner`.
"""

from treadle.rl.evaluation.estimators import Curve, TaskOutcome, curves, max_k, pass_at_k, pass_hat_k
from treadle.rl.evaluation.report import EvalReport, plot_curves

__all__ = [
    "Curve",
    "EvalReport",
    "TaskOutcome",
    "curves",
    "max_k",
    "pass_at_k",
    "pass_hat_k",
    "plot_curves",
]
