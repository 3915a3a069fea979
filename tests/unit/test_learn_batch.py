"""The learner's data path: Trace dicts + feedback → IS/PPO and supervised datums on the recorded ids."""

from __future__ import annotations

from typing import Any

import pytest

from treadle.learn.batch import (
    Labeled,
    advantages,
    build_batch,
    feedback_signal,
    rl_datum,
    sft_datum,
    staleness,
)


def _trace(seq: int, prompt: list[int], completion: list[int], **kw: Any) -> dict[str, Any]:
    return {
        "completion_id": f"c{seq}",
        "seq": seq,
        "version": kw.pop("version", 1),
        "model_path": kw.pop("model_path", "base"),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "completion_logprobs": kw.pop("logprobs", [-0.5 - 0.1 * i for i in range(len(completion))]),
        "feedback": kw.pop("feedback", []),
        **kw,
    }


def _list(td: Any) -> list[Any]:
    return td.tolist()


def test_feedback_signal_latest_reward_wins_over_rating_and_keeps_correction() -> None:
    t = _trace(
        1,
        [1, 2],
        [3],
        feedback=[
            {"reward": 0.2, "created_at": "2026-01-01T00:00:01"},
            {"rating": -1, "created_at": "2026-01-01T00:00:02"},
            {"correction": "Paris.", "created_at": "2026-01-01T00:00:03"},
            {"reward": 0.9, "created_at": "2026-01-01T00:00:04"},
        ],
    )
    assert feedback_signal(t) == (0.9, "Paris.")
    assert feedback_signal(_trace(2, [1], [2], feedback=[{"rating": -1}])) == (-1.0, None)
    assert feedback_signal(_trace(3, [1], [2], feedback=[{"comment": "meh"}])) == (None, None)


def test_advantages_center_on_same_prompt_group_else_batch_mean() -> None:
    # two traces share prompt "a": centered on their own mean; singletons on the batch mean (0.375)
    advs = advantages([1.0, 0.0, 0.5, 0.0], ["a", "a", "b", "c"])
    assert advs == pytest.approx([0.5, -0.5, 0.125, -0.375])
    assert advantages([], []) == []


def test_rl_datum_uses_recorded_ids_and_logprobs_with_loss_only_on_completion() -> None:
    t = _trace(1, [10, 11, 12], [20, 21, 22], logprobs=[-0.1, -0.2, -0.3])
    d = rl_datum(t, advantage=0.75)
    assert d.model_input.to_ints() == [10, 11, 12, 20, 21]
    assert _list(d.loss_fn_inputs["target_tokens"]) == [11, 12, 20, 21, 22]
    assert _list(d.loss_fn_inputs["logprobs"]) == pytest.approx([0.0, 0.0, -0.1, -0.2, -0.3])
    assert _list(d.loss_fn_inputs["advantages"]) == pytest.approx([0.0, 0.0, 0.75, 0.75, 0.75])


def test_rl_datum_refuses_misaligned_or_empty_traces() -> None:
    with pytest.raises(ValueError, match="2 completion_tokens but 1 completion_logprobs"):
        rl_datum(_trace(1, [1, 2], [3, 4], logprobs=[-0.1]), 1.0)
    with pytest.raises(ValueError, match="no prompt_tokens"):
        rl_datum(_trace(2, [], [3], logprobs=[-0.1]), 1.0)
    with pytest.raises(ValueError, match="empty completion"):
        rl_datum(_trace(3, [1], [], logprobs=[]), 1.0)
    with pytest.raises(ValueError, match="non-finite"):
        rl_datum(_trace(4, [1], [2], logprobs=[float("nan")]), 1.0)


def test_sft_datum_is_recorded_prompt_plus_correction_plus_end_of_turn() -> None:
    d = sft_datum([5, 6, 7], [30, 31], [2])
    assert d.model_input.to_ints() == [5, 6, 7, 30, 31]
    assert _list(d.loss_fn_inputs["target_tokens"]) == [6, 7, 30, 31, 2]
    assert _list(d.loss_fn_inputs["weights"]) == pytest.approx([0.0, 0.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        sft_datum([5], [], [])


def test_staleness_counts_steps_since_the_serving_weights() -> None:
    steps = {"base": 0, "tinker://r/sampler_weights/c1": 2}
    assert staleness(_trace(1, [1], [2], model_path="tinker://r/sampler_weights/c1"), steps, 2) == 0
    assert staleness(_trace(2, [1], [2], model_path="base"), steps, 4) == 4
    assert staleness(_trace(3, [1], [2], model_path="unknown"), steps, 3) == 3


def test_build_batch_drops_stale_skips_zero_advantage_and_tokenizes_only_corrections() -> None:
    seen: list[str] = []

    def tokenize(text: str) -> list[int]:
        seen.append(text)
        return [100 + len(text)]

    fresh_good = Labeled(_trace(1, [1, 2], [3, 4]), reward=1.0, correction=None, staleness=0)
    fresh_bad = Labeled(_trace(2, [1, 2], [5]), reward=0.0, correction="Paris.", staleness=1)
    too_old = Labeled(_trace(3, [9, 9], [5]), reward=1.0, correction="x", staleness=5)
    same = Labeled(_trace(4, [7, 7], [8]), reward=0.5, correction=None, staleness=0)
    batch = build_batch([fresh_good, fresh_bad, too_old, same], tokenize, [2], max_staleness=2)
    assert seen == ["Paris."]  # the served completions are never re-tokenized
    # fresh_good/fresh_bad share a prompt: ±0.5; `same` is centered on the batch mean 0.5 → 0, dropped
    assert len(batch.rl) == 2
    assert [_list(d.loss_fn_inputs["advantages"])[-1] for d in batch.rl] == pytest.approx([0.5, -0.5])
    assert len(batch.sft) == 1
    assert batch.sft[0].model_input.to_ints() == [1, 2, 106]
    assert batch.stats["dropped_stale"] == 1.0
    assert batch.stats["mean_reward"] == pytest.approx(0.5)
    assert batch.stats["on_policy_frac"] == pytest.approx(2 / 3)
    assert batch.stats["max_staleness"] == 1.0

    only_sft = build_batch([fresh_good, fresh_bad], tokenize, [2], use_rewards=False)
    assert (len(only_sft.rl), len(only_sft.sft)) == (0, 1)
    assert only_sft.stats["mean_reward"] is None
