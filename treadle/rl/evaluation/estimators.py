"""Unbiased pass@k and pass^k estimators over tasks with n trials each, and bootstrap confidence intervals.

Per task with c successes out of n independent trials (τ-bench, Yao et al. 2024, arXiv 2406.12045 §5):

    pass^k = C(c, k) / C(n, k)          probability that k trials drawn without replacement ALL succeed
    pass@k = 1 − C(n − c, k) / C(n, k)  probability that AT LEAST ONE of them succeeds

Both are unbiased for p^k and 1 − (1 − p)^k when the trials are i.i.d.; the benchmark number is the mean over
tasks. Confidence intervals resample tasks with replacement (the trials of a task stay together), which is the
source of variance a reader cares about when comparing two policies on the same task set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from math import comb

import numpy as np


@dataclasses.dataclass(frozen=True)
class TaskOutcome:
    """The trials of one task: n attempts, c of them successful."""

    task_id: str
    n: int
    c: int

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"task {self.task_id!r}: n (trials) must be >= 1, got {self.n}")
        if not 0 <= self.c <= self.n:
            raise ValueError(f"task {self.task_id!r}: c (successes) must be in 0..n={self.n}, got {self.c}")


def _check_k(n: int, k: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..n={n}, got {k}")


def pass_hat_k(n: int, c: int, k: int) -> float:
    """pass^k of one task: all k of k trials (drawn from the n) succeed."""
    _check_k(n, k)
    return comb(c, k) / comb(n, k)


def pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k of one task: at least one of k trials (drawn from the n) succeeds."""
    _check_k(n, k)
    return 1.0 - comb(n - c, k) / comb(n, k)


def max_k(outcomes: Sequence[TaskOutcome]) -> int:
    """The largest k every task supports (tau2-bench caps k at the smallest trial count)."""
    if not outcomes:
        raise ValueError("no tasks: the evaluation produced no outcomes to score")
    return min(o.n for o in outcomes)


def _table(outcomes: Sequence[TaskOutcome], ks: Sequence[int], hat: bool) -> np.ndarray:
    """Per-task estimates, shape (tasks, len(ks))."""
    fn = pass_hat_k if hat else pass_at_k
    return np.array([[fn(o.n, o.c, k) for k in ks] for o in outcomes], dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class Curve:
    """A metric for k = 1..K: the mean over tasks and a bootstrap confidence interval per k."""

    name: str
    ks: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]


def curves(
    outcomes: Sequence[TaskOutcome],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[Curve, Curve]:
    """pass^k and pass@k for k = 1..max_k with percentile-bootstrap CIs over tasks (fixed seed: reproducible)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    ks = list(range(1, max_k(outcomes) + 1))
    rng = np.random.default_rng(seed)
    # One index matrix for both metrics, so their intervals come from the same resampled task sets.
    idx_R_T = rng.integers(0, len(outcomes), size=(resamples, len(outcomes)))
    alpha = (1.0 - confidence) / 2.0
    result = []
    for name, hat in (("pass^k", True), ("pass@k", False)):
        est_T_K = _table(outcomes, ks, hat)
        boot_R_K = est_T_K[idx_R_T].mean(axis=1)
        result.append(
            Curve(
                name=name,
                ks=ks,
                mean=[float(x) for x in est_T_K.mean(axis=0)],
                low=[float(x) for x in np.quantile(boot_R_K, alpha, axis=0)],
                high=[float(x) for x in np.quantile(boot_R_K, 1.0 - alpha, axis=0)],
            )
        )
    return result[0], result[1]
