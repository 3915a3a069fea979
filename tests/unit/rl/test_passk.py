"""pass^k and pass@k estimators against brute-force enumeration of every k-subset of a task's trials."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from treadle.rl.evaluation import EvalReport, TaskOutcome, curves, pass_at_k, pass_hat_k


def brute_force(trials: list[bool], k: int) -> tuple[float, float]:
    """(pass^k, pass@k) as the fraction of k-subsets of the trials where all / any succeed."""
    subsets = list(itertools.combinations(trials, k))
    return (
        sum(all(s) for s in subsets) / len(subsets),
        sum(any(s) for s in subsets) / len(subsets),
    )


@given(
    trials=st.lists(st.booleans(), min_size=1, max_size=9),
    data=st.data(),
)
def test_estimators_equal_enumeration_of_k_subsets(trials: list[bool], data: st.DataObject) -> None:
    k = data.draw(st.integers(1, len(trials)))
    hat, at = brute_force(trials, k)
    n, c = len(trials), sum(trials)
    assert pass_hat_k(n, c, k) == pytest.approx(hat, abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(at, abs=1e-12)


def test_known_values_and_edges() -> None:
    # 2 of 4 succeed: pass^2 = C(2,2)/C(4,2) = 1/6; pass@2 = 1 − C(2,2)/C(4,2) = 5/6.
    assert pass_hat_k(4, 2, 2) == pytest.approx(1 / 6)
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    # k = 1: both are the success rate.
    assert pass_hat_k(5, 3, 1) == pass_at_k(5, 3, 1) == pytest.approx(0.6)
    # fewer successes than k: pass^k is exactly 0; all succeed: both are 1.
    assert pass_hat_k(5, 2, 3) == 0.0
    assert pass_hat_k(3, 3, 3) == pass_at_k(3, 3, 3) == 1.0


@pytest.mark.parametrize(("n", "c", "k", "field"), [(3, 1, 0, "k"), (3, 1, 4, "k")])
def test_k_out_of_range_is_an_error_naming_k(n: int, c: int, k: int, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must be in 1\.\.n=3"):
        pass_hat_k(n, c, k)


def test_bad_outcomes_are_rejected_with_the_task_named() -> None:
    with pytest.raises(ValueError, match=r"task 't7': c \(successes\) must be in 0\.\.n=2, got 3"):
        TaskOutcome("t7", n=2, c=3)
    with pytest.raises(ValueError, match=r"n \(trials\) must be >= 1"):
        TaskOutcome("t0", n=0, c=0)
    with pytest.raises(ValueError, match="no tasks"):
        curves([])


def test_curves_are_the_mean_over_tasks_with_bands_around_it() -> None:
    outcomes = [
        TaskOutcome("a", 4, 4),
        TaskOutcome("b", 4, 2),
        TaskOutcome("c", 4, 0),
        TaskOutcome("d", 4, 1),
    ]
    hat, at = curves(outcomes, resamples=500, seed=1)
    assert hat.ks == at.ks == [1, 2, 3, 4]
    for k in hat.ks:
        want_hat = sum(pass_hat_k(o.n, o.c, k) for o in outcomes) / len(outcomes)
        want_at = sum(pass_at_k(o.n, o.c, k) for o in outcomes) / len(outcomes)
        assert hat.mean[k - 1] == pytest.approx(want_hat)
        assert at.mean[k - 1] == pytest.approx(want_at)
    # pass^k never rises with k, pass@k never falls, and they agree at k = 1.
    assert all(x >= y - 1e-12 for x, y in itertools.pairwise(hat.mean))
    assert all(x <= y + 1e-12 for x, y in itertools.pairwise(at.mean))
    assert hat.mean[0] == pytest.approx(at.mean[0]) == pytest.approx(7 / 16)
    for c in (hat, at):
        for lo, m, hi in zip(c.low, c.mean, c.high, strict=True):
            assert 0.0 <= lo <= m + 1e-12 and m - 1e-12 <= hi <= 1.0
    # tasks differ, so the bootstrap band is not a point; the same seed gives the same band.
    assert hat.high[0] - hat.low[0] > 0.1
    assert curves(outcomes, resamples=500, seed=1) == (hat, at)


def test_k_is_capped_at_the_smallest_trial_count() -> None:
    hat, _ = curves([TaskOutcome("a", 5, 3), TaskOutcome("b", 3, 3)])
    assert hat.ks == [1, 2, 3]


def test_report_writes_table_json_and_png(tmp_path: Path) -> None:
    outcomes = [TaskOutcome("a", 3, 3), TaskOutcome("b", 3, 1)]
    report = EvalReport.from_outcomes(
        env="demo", model="base", split="test", trials=3, outcomes=outcomes, mean_reward=0.5
    )
    table = report.table()
    assert "pass^k" in table and "pass@k" in table and len(table.splitlines()) == 2 + 3
    json_path, png_path = report.write(tmp_path / "out")
    doc = json.loads(json_path.read_text())
    assert doc["pass@1"] == pytest.approx(4 / 6)
    assert doc["pass^k"]["mean"][2] == pytest.approx(0.5)  # task a always, task b never at k = 3
    assert doc["per_task"][1] == {"task_id": "b", "n": 3, "c": 1}
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
