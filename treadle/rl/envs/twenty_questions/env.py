"""20 Questions with a white-box oracle: exact answers from the knowledge base, information-gain rewards.

Each question narrows the candidate list; its reward is log2(candidates before / after) / log2(N), so the
questions of a whole episode sum to at most 1 whatever they are (asking again, or something already implied,
earns 0). A correct `Guess:` ends the episode with (turns left + 1) / max_turns; a wrong guess ends it with 0.
A question outside the vocabulary is answered "Unknown" and costs the turn.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any

import chz
from tinker_cookbook.renderers import Message

from treadle.rl.envs.dataset import TreadleEnvDatasetBuilder
from treadle.rl.envs.episode import Turn, TurnEnv
from treadle.rl.envs.spec import DEMO_KEY, ConfigKey, EnvLimits, EnvSpec, seed_key
from treadle.rl.envs.twenty_questions.kb import ATTRIBUTES, Entity, split_entities

LIMITS = EnvLimits(
    max_turns=10,
    max_tokens_per_turn=32,
    max_trajectory_tokens=2048,
    max_tool_calls=0,
    tool_timeout_s=0.0,
    episode_timeout_s=120.0,
)
# level -> number of candidates listed in the prompt (the target is one of them)
CANDIDATES_BY_LEVEL = {1: 2, 2: 4, 3: 8, 4: 16}
TASKS_PER_SPLIT = {"train": 2000, "test": 200}
FORMAT_PENALTY = -0.1

SYSTEM_PROMPT = (
    "We play 20 Questions. I am thinking of one creature from the list below. Ask about one attribute per turn, "
    "like 'Question: is the color red?'. I answer Yes or No. When you know it, write 'Guess: NAME', "
    "like 'Guess: Vopa'. "
    "A wrong guess ends the game."
)


# Names use letters the generator never does (w, x), so they can never be a real candidate.
DEMO: list[Message] = [
    {
        "role": "user",
        "content": "Candidates:\n- Wexo: color red, size tiny, habitat sea, diet meat, legs two, flies no\n"
        "- Xawi: color blue, size tiny, habitat sea, diet meat, legs two, flies no\nAsk your first question.",
    },
    {"role": "assistant", "content": "Question: is the color red?"},
    {"role": "user", "content": "Yes."},
    {"role": "assistant", "content": "Guess: Wexo"},
    {"role": "user", "content": "Correct!"},
]


@dataclass(frozen=True)
class TwentyQuestionsTask:
    candidates: tuple[Entity, ...]
    target: Entity


def make_tasks(split: str, config: dict[str, Any]) -> list[TwentyQuestionsTask]:
    """Deterministic episodes for one split: a candidate list drawn from that split's entities and a target."""
    pool = split_entities(split)
    n = CANDIDATES_BY_LEVEL[int(config["level"])]
    rng = random.Random(f"20q/{split}/{config['level']}/{config['seed']}")
    tasks = []
    for _ in range(TASKS_PER_SPLIT[split]):
        candidates = tuple(rng.sample(pool, n))
        tasks.append(TwentyQuestionsTask(candidates, rng.choice(candidates)))
    return tasks


@dataclass(frozen=True)
class Parsed:
    kind: str  # "guess" | "question" | "unknown" | "malformed"
    name: str = ""
    attribute: str = ""
    value: str = ""


_WORD = re.compile(r"[a-z]+")


def parse_action(text: str) -> Parsed:
    """`Guess: NAME`, or a question naming exactly one attribute and one of its values; else unknown/malformed."""
    stripped = text.strip()
    guess = re.match(r"(?is)\s*guess\s*:\s*([A-Za-z]+)", stripped)
    if guess:
        return Parsed("guess", name=guess.group(1).capitalize())
    if not re.match(r"(?is)\s*question\s*:", stripped) and "?" not in stripped:
        return Parsed("malformed")
    words = set(_WORD.findall(stripped.lower()))
    attrs = [a for a in ATTRIBUTES if a in words]
    values = [(a, v) for a, vs in ATTRIBUTES.items() for v in vs if v in words]
    if len(values) == 1 and (not attrs or attrs == [values[0][0]]):
        attribute, value = values[0]
        # yes/no alone is ambiguous only if the attribute is not named; `flies` is the one boolean attribute.
        return Parsed("question", attribute=attribute, value=value)
    return Parsed("unknown")


def _vocabulary_text() -> str:
    return "; ".join(f"{a}: {', '.join(vs)}" for a, vs in ATTRIBUTES.items())


class TwentyQuestionsEnv(TurnEnv):
    def __init__(self, task: TwentyQuestionsTask, limits: EnvLimits = LIMITS, demo: bool = False) -> None:
        rows = "\n".join(
            f"- {e.name}: " + ", ".join(f"{a} {v}" for a, v in e.attributes) for e in task.candidates
        )
        prompt = f"Candidates:\n{rows}\nAttributes: {_vocabulary_text()}.\nAsk your first question."
        super().__init__(SYSTEM_PROMPT, prompt, limits, DEMO if demo else None)
        self.task = task
        self.remaining: list[Entity] = list(task.candidates)
        self.scale = math.log2(len(task.candidates)) if len(task.candidates) > 1 else 1.0
        self.solved = False

    async def respond(self, text: str) -> Turn:
        action = parse_action(text)
        if action.kind == "guess":
            return self._guess(action.name)
        if action.kind == "question":
            return self._answer(action.attribute, action.value)
        if action.kind == "unknown":
            return Turn(
                0.0, "Unknown: ask about one attribute and one value from the list.", metrics={"unknown": 1}
            )
        return Turn(
            FORMAT_PENALTY,
            "Write 'Question: is the ATTRIBUTE VALUE?' or 'Guess: NAME'.",
            metrics={"format_error": 1},
        )

    def _answer(self, attribute: str, value: str) -> Turn:
        truth = self.task.target.value(attribute) == value
        before = len(self.remaining)
        self.remaining = [e for e in self.remaining if (e.value(attribute) == value) == truth]
        gain = math.log2(before / len(self.remaining)) / self.scale
        return Turn(gain, "Yes." if truth else "No.", metrics={"info_gain_bits": gain * self.scale})

    def _guess(self, name: str) -> Turn:
        if name == self.task.target.name:
            self.solved = True
            bonus = (self.limits.max_turns - self.turns + 1) / self.limits.max_turns
            return Turn(bonus, "Correct!", done=True, metrics={"solved": 1})
        return Turn(0.0, "Wrong.", done=True, metrics={"solved": 0})


SPEC = EnvSpec(
    name="twenty_questions",
    limits=LIMITS,
    tools=(),
    config_keys=(
        ConfigKey("level", 2, "candidates listed: 1=2, 2=4, 3=8, 4=16", choices=(1, 2, 3, 4)),
        seed_key("task"),
        DEMO_KEY,
    ),
    make_tasks=make_tasks,
    make_env=lambda task, config: TwentyQuestionsEnv(task, demo=bool(config.get("demo", 0))),
)


@chz.chz
class TwentyQuestionsDatasetBuilder(TreadleEnvDatasetBuilder):
    """`rl.train` dataset builder for 20 Questions (`env_config={"level": 1..4}`)."""

    env_name: str = "twenty_questions"
