"""Traces + feedback → training data, on the recorded token ids (never re-tokenizing what was served).

A rewarded trace becomes an importance-sampling/PPO datum over its recorded prompt and completion ids, with the
recorded sampler log-probs as the behaviour policy (so updates on stale traces are importance-corrected). A
correction becomes a supervised datum: the recorded prompt ids + the tokenized correction + end-of-turn.
Everything here is pure (Trace dicts in, `tinker.types.Datum` out) so it tests without a server.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from tinker import types

Trace = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Labeled:
    """One trace with the signal the learner takes from it."""

    trace: Trace
    reward: float | None
    correction: str | None
    staleness: int  # optimizer steps between the weights that served it and the weights being trained


@dataclasses.dataclass
class Batch:
    rl: list[types.Datum]
    sft: list[types.Datum]
    stats: dict[str, float | None]  # None: not defined for this batch (e.g. no rewards)


def feedback_signal(trace: Trace) -> tuple[float | None, str | None]:
    """(reward, correction) from a trace's feedback, latest first: `reward` wins over `rating` (±1)."""
    reward: float | None = None
    rating: float | None = None
    correction: str | None = None
    for fb in sorted(trace.get("feedback") or [], key=lambda f: str(f.get("created_at", ""))):
        if fb.get("reward") is not None:
            reward = float(fb["reward"])
        if fb.get("rating") is not None:
            rating = float(fb["rating"])
        if fb.get("correction"):
            correction = str(fb["correction"])
    return (reward if reward is not None else rating), correction


def staleness(trace: Trace, step_by_model_path: dict[str, int], current_step: int) -> int:
    """Steps the trained weights are ahead of the weights that served `trace` (a model path the learner did
    not produce counts as where it started, step 0)."""
    return max(0, current_step - step_by_model_path.get(str(trace.get("model_path")), 0))


def _check_trace(trace: Trace) -> tuple[list[int], list[int], list[float]]:
    prompt = [int(t) for t in trace.get("prompt_tokens") or []]
    completion = [int(t) for t in trace.get("completion_tokens") or []]
    logprobs = [float(x) for x in trace.get("completion_logprobs") or []]
    cid = trace.get("completion_id")
    if not prompt:
        raise ValueError(f"trace {cid}: no prompt_tokens")
    if len(logprobs) != len(completion):
        raise ValueError(
            f"trace {cid}: {len(completion)} completion_tokens but {len(logprobs)} completion_logprobs"
        )
    if not all(math.isfinite(x) for x in logprobs):
        raise ValueError(f"trace {cid}: non-finite completion_logprobs")
    return prompt, completion, logprobs


def advantages(rewards: Sequence[float], groups: Sequence[object]) -> list[float]:
    """Reward minus a baseline: the mean of the traces with the same group key (same prompt) when there are
    several, else the batch mean (a single trace carries no contrast of its own)."""
    if not rewards:
        return []
    batch_mean = sum(rewards) / len(rewards)
    by_group: dict[object, list[float]] = {}
    for r, g in zip(rewards, groups, strict=True):
        by_group.setdefault(g, []).append(r)
    out: list[float] = []
    for r, g in zip(rewards, groups, strict=True):
        members = by_group[g]
        baseline = sum(members) / len(members) if len(members) > 1 else batch_mean
        out.append(r - baseline)
    return out


def _ints(values: list[int]) -> types.TensorData:
    return types.TensorData(data=values, dtype="int64", shape=[len(values)])


def _floats(values: list[float]) -> types.TensorData:
    return types.TensorData(data=values, dtype="float32", shape=[len(values)])


def rl_datum(trace: Trace, advantage: float) -> types.Datum:
    """The served sequence as one datum: targets are the next tokens, loss only on the completion, whose
    recorded sampler log-probs are the importance-sampling denominators."""
    prompt, completion, logprobs = _check_trace(trace)
    if not completion:
        raise ValueError(f"trace {trace.get('completion_id')}: empty completion")
    tokens = prompt + completion
    pad = len(prompt) - 1
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": _ints(tokens[1:]),
            "logprobs": _floats([0.0] * pad + logprobs),
            "advantages": _floats([0.0] * pad + [float(advantage)] * len(completion)),
        },
    )


def sft_datum(
    prompt_tokens: Sequence[int], correction_ids: Sequence[int], eot_ids: Sequence[int]
) -> types.Datum:
    """Supervised target: the recorded prompt ids, then the correction and end-of-turn, weighted 1."""
    answer = [int(t) for t in correction_ids] + [int(t) for t in eot_ids]
    if not prompt_tokens or not answer:
        raise ValueError("a supervised datum needs prompt tokens and a non-empty correction")
    tokens = [int(t) for t in prompt_tokens] + answer
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": _ints(tokens[1:]),
            "weights": _floats([0.0] * (len(prompt_tokens) - 1) + [1.0] * len(answer)),
        },
    )


def build_batch(
    labeled: Sequence[Labeled],
    tokenize: Callable[[str], list[int]],
    eot_ids: Sequence[int],
    *,
    use_rewards: bool = True,
    use_corrections: bool = True,
    max_staleness: int | None = None,
) -> Batch:
    """Datums for one cycle. Too-stale traces are dropped (counted); zero-advantage ones add nothing."""
    fresh = [x for x in labeled if max_staleness is None or x.staleness <= max_staleness]
    rewarded = [x for x in fresh if x.reward is not None and use_rewards]
    rewards = [float(x.reward) for x in rewarded if x.reward is not None]
    advs = advantages(rewards, [tuple(x.trace.get("prompt_tokens") or []) for x in rewarded])
    rl = [rl_datum(x.trace, a) for x, a in zip(rewarded, advs, strict=True) if a != 0.0]
    corrected = [x for x in fresh if x.correction and use_corrections]
    sft = [sft_datum(x.trace["prompt_tokens"], tokenize(x.correction or ""), eot_ids) for x in corrected]
    stale = [x.staleness for x in fresh]
    stats: dict[str, float | None] = {
        "traces": float(len(labeled)),
        "dropped_stale": float(len(labeled) - len(fresh)),
        "rewarded": float(len(rewarded)),
        "rl_datums": float(len(rl)),
        "sft_datums": float(len(sft)),
        "mean_reward": sum(rewards) / len(rewards) if rewards else None,
        "on_policy_frac": sum(1 for s in stale if s == 0) / len(stale) if stale else None,
        "max_staleness": float(max(stale)) if stale else 0.0,
    }
    return Batch(rl=rl, sft=sft, stats=stats)
