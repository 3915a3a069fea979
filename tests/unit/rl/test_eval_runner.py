"""The trial runner on the cookbook's own arithmetic env, driven by a scripted policy with known successes.

The policy reads each prompt, computes x + y and answers right only when x is even, so every task's success count
is known in advance (all trials or none). The env, renderer, tokenizer and rollout code are the real ones.
"""

from __future__ import annotations

import asyncio
import re
from functools import partial

import pytest
import tinker
from tinker_cookbook import renderers
from tinker_cookbook.completers import StopCondition, TokenCompleter, TokensWithLogprobs
from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticEnv
from tinker_cookbook.rl.problem_env import ProblemGroupBuilder
from transformers import AutoTokenizer

from treadle.models.embedded import embedded_tokenizer_dir
from treadle.rl.evaluation.runner import run_trials

QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")


class EvenOnlyPolicy(TokenCompleter):
    """Answers x + y correctly when x is even, x + y + 1 otherwise; raises on x == 13 (a crashing rollout)."""

    def __init__(self, tokenizer: object, stop_token: int) -> None:
        self.tokenizer = tokenizer
        self.stop_token = stop_token

    async def __call__(
        self, model_input: tinker.ModelInput, stop: StopCondition, *, max_tokens: int | None = None
    ) -> TokensWithLogprobs:
        text = self.tokenizer.decode(model_input.to_ints())  # type: ignore[attr-defined]
        x, y = map(int, QUESTION.findall(text)[-1])
        if x == 13:
            raise RuntimeError("sampler unavailable")
        answer = x + y if x % 2 == 0 else x + y + 1
        tokens = self.tokenizer.encode(str(answer), add_special_tokens=False) + [self.stop_token]  # type: ignore[attr-defined]
        return TokensWithLogprobs(tokens=tokens, maybe_logprobs=[0.0] * len(tokens))


@pytest.fixture(scope="module")
def renderer() -> renderers.Renderer:
    tok = AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir()))
    return renderers.get_renderer("qwen3_instruct", tokenizer=tok)


def builder(renderer: renderers.Renderer, x: int, y: int, group: int) -> ProblemGroupBuilder:
    return ProblemGroupBuilder(env_thunk=partial(ArithmeticEnv, x, y, renderer=renderer), num_envs=group)


def test_successes_per_task_match_the_scripted_policy(renderer: renderers.Renderer) -> None:
    tok = renderer.tokenizer
    stop = renderer.get_stop_sequences()[0]
    assert isinstance(stop, int)
    policy = EvenOnlyPolicy(tok, stop)
    # group size 2 and 5 trials: the runner asks each builder for 3 groups and keeps 5 rollouts.
    tasks = [builder(renderer, x, 7, group=2) for x in (2, 3, 10, 13)]
    results = asyncio.run(run_trials(tasks, policy, trials=5, concurrency=3))
    assert [len(t.trials) for t in results] == [5, 5, 5, 5]
    assert [t.outcome().c for t in results] == [5, 0, 5, 0]
    assert all(tr.reward == pytest.approx(1.0) for tr in results[0].trials)
    # the crashing task: failed trials with the error recorded, the other tasks unaffected
    assert all(tr.error and "sampler unavailable" in tr.error for tr in results[3].trials)
    assert all(tr.error is None and tr.stop_reason != "error" for tr in results[1].trials)
    assert results[0].task_id == "0:problems"


def test_bad_arguments_name_the_field(renderer: renderers.Renderer) -> None:
    policy = EvenOnlyPolicy(renderer.tokenizer, 0)
    with pytest.raises(ValueError, match="trials must be >= 1, got 0"):
        asyncio.run(run_trials([builder(renderer, 2, 2, 1)], policy, trials=0))
    with pytest.raises(ValueError, match="no tasks"):
        asyncio.run(run_trials([], policy, trials=2))
