"""20 Questions: exact oracle answers, information-gain rewards and terminal rewards on scripted episodes."""

from __future__ import annotations

import math

from tests.unit.rl.helpers import play, stop_reason
from treadle.rl.envs.twenty_questions.env import (
    TwentyQuestionsEnv,
    TwentyQuestionsTask,
    make_tasks,
    parse_action,
)
from treadle.rl.envs.twenty_questions.kb import ATTRIBUTES, build_entities, split_entities


def _task(level: int = 3) -> TwentyQuestionsTask:
    return make_tasks("train", {"level": level, "seed": 0})[0]


def test_kb_exact_and_split_disjoint() -> None:
    entities = build_entities()
    assert len({e.name for e in entities}) == len(entities)
    assert len({e.attributes for e in entities}) == len(entities)
    train = {e.name for e in split_entities("train")}
    test = {e.name for e in split_entities("test")}
    assert not train & test and len(train) + len(test) == len(entities)


def test_parse_action() -> None:
    assert parse_action("Question: is the color red?").attribute == "color"
    assert parse_action("Is it huge?").value == "huge"
    assert parse_action("Guess: vopa").name == "Vopa"
    assert parse_action("Question: is the color red or blue?").kind == "unknown"
    assert parse_action("Question: is it purple?").kind == "unknown"
    assert parse_action("I think so").kind == "malformed"


def test_information_gain_rewards_sum_to_log2_candidates() -> None:
    task = _task()
    target = task.target
    env = TwentyQuestionsEnv(task)
    # ask the target's true value of every attribute: the candidate set shrinks to the target alone
    questions = [f"Question: is the {a} {target.value(a)}?" for a in ATTRIBUTES]
    results = play(env, questions[:9] + [f"Guess: {target.name}"])
    gains = [r.reward for r in results if "info_gain_bits" in r.metrics]
    assert math.isclose(sum(gains), 1.0)  # normalised: log2(N)/log2(N)
    assert env.remaining == [target]
    assert results[-1].metrics["solved"] == 1
    turns = len(results)
    assert math.isclose(results[-1].reward, (10 - turns + 1) / 10)
    assert stop_reason(results) == "completed"


def test_repeated_question_earns_nothing_and_oracle_is_exact() -> None:
    task = _task()
    attr = "color"
    value = task.target.value(attr)
    results = play(TwentyQuestionsEnv(task), [f"Question: is the {attr} {value}?"] * 3 + ["Guess: Nobody"])
    assert results[0].next_messages[-1]["content"] == "Yes."
    assert results[1].reward == 0.0 and results[2].reward == 0.0
    assert results[-1].reward == 0.0 and results[-1].metrics["solved"] == 0
    wrong = next(v for v in ATTRIBUTES[attr] if v != value)
    no = play(TwentyQuestionsEnv(task), [f"Question: is the {attr} {wrong}?", "Guess: Nobody"])
    assert no[0].next_messages[-1]["content"] == "No."


def test_unknown_and_malformed_cost_a_turn() -> None:
    results = play(TwentyQuestionsEnv(_task()), ["Question: is it purple?", "blah", "Guess: Nobody"])
    assert results[0].reward == 0.0 and str(results[0].next_messages[-1]["content"]).startswith("Unknown")
    assert results[1].reward == -0.1 and results[1].metrics["format_error"] == 1
    assert len(results) == 3


def test_levels_set_candidate_count() -> None:
    for level, n in {1: 2, 2: 4, 3: 8, 4: 16}.items():
        task = make_tasks("test", {"level": level, "seed": 0})[0]
        assert len(task.candidates) == n and task.target in task.candidates
