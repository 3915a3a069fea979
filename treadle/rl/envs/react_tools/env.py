"""ReAct tool use: think, call a Python or calculator tool in the sandbox, read its output, answer.

Turns: `<python>CODE</python>` runs CODE in the subprocess sandbox (its output or error is shown);
`<calc>EXPR</calc>` prints EXPR evaluated by the same sandboxed Python; `Answer: N` ends the episode.
Reward: 1 if N is exactly the answer, else 0. A malformed tool call (unclosed tag, empty code) is answered
with what is wrong and costs the turn. Tool errors (exceptions, timeouts, refused escapes) are shown to the
policy; a sandbox that cannot start ends the episode with stop reason `tool_error` and reward 0.
"""

from __future__ import annotations

import re
from typing import Any

import chz
from tinker_cookbook.renderers import Message
from tinker_cookbook.rl.types import StopReason

from treadle.rl.envs.dataset import TreadleEnvDatasetBuilder
from treadle.rl.envs.episode import Turn, TurnEnv
from treadle.rl.envs.react_tools.problems import WordProblem, make_problems
from treadle.rl.envs.spec import DEMO_KEY, ConfigKey, EnvLimits, EnvSpec, seed_key
from treadle.rl.sandbox.limits import SandboxLimits
from treadle.rl.sandbox.subprocess_sandbox import SubprocessSandbox

LIMITS = EnvLimits(
    max_turns=6,
    max_tokens_per_turn=128,
    max_trajectory_tokens=4096,
    max_tool_calls=4,
    tool_timeout_s=5.0,
    episode_timeout_s=120.0,
)
TOOL_OUTPUT_CHARS = 600
# `hint=1` (a curriculum aid): the untrained 135M default model almost never writes a tool call on its own
# (0 of 48 samples with the demo); ending the task with this nudge gets one in about six, enough for RL to start.
HINT = "\nReply with a <calc> tool call first."
# `tool_bonus=B` (curriculum shaping, default 0): the episode's first tool call that runs without error earns B.
# Paid once per episode and capped below the answer's 1.0, so calling tools without answering never beats
# answering (the exploit suite checks the tool-loop policy against the honest one).
MAX_TOOL_BONUS = 0.5

SYSTEM_PROMPT = (
    "Solve the word problem. You can use tools: <calc>EXPRESSION</calc> evaluates arithmetic, and "
    "<python>CODE</python> runs Python and shows what it prints. When you know the result, reply "
    "'Answer: NUMBER'.\n"
    "Example: for '3 boxes hold 4 pens each. How many pens?' reply <calc>3*4</calc>, read 'Output: 12', "
    "then reply Answer: 12"
)
DEMO: list[Message] = [
    {"role": "user", "content": "3 boxes hold 4 pens each. How many pens are there?"},
    {"role": "assistant", "content": "<calc>3*4</calc>"},
    {"role": "user", "content": "Output:\n12"},
    {"role": "assistant", "content": "Answer: 12"},
    {"role": "user", "content": "Correct."},
]
_TOOL = re.compile(r"<(python|calc)>(.*?)</\1>", re.S | re.I)
_OPEN_TAG = re.compile(r"<(python|calc)>", re.I)
_ANSWER = re.compile(r"answer\s*:\s*(.*)", re.I | re.S)
_INT = re.compile(r"^\s*\$?\s*(-?[\d,]+)(?:\.0+)?\s*(?:dollars|[a-z ]*)?\s*\.?\s*$", re.I)


def parse_answer(text: str) -> int | None:
    """The single integer after `Answer:`; None if there is not exactly one."""
    match = _ANSWER.search(text)
    if not match:
        return None
    body = match.group(1).strip().splitlines()[0] if match.group(1).strip() else ""
    number = _INT.match(body)
    if not number:
        return None
    try:
        return int(number.group(1).replace(",", ""))
    except ValueError:
        return None


class ReactToolsEnv(TurnEnv):
    def __init__(
        self,
        task: WordProblem,
        limits: EnvLimits = LIMITS,
        sandbox_dir: str | None = None,
        demo: bool = False,
        hint: bool = False,
        tool_bonus: float = 0.0,
    ) -> None:
        question = task.question + (HINT if hint else "")
        super().__init__(SYSTEM_PROMPT, question, limits, DEMO if demo else None)
        self.task = task
        self.sandbox_dir = sandbox_dir
        self.sandbox: SubprocessSandbox | None = None
        self.correct = False
        self.tool_bonus = tool_bonus
        self.bonus_paid = False

    async def respond(self, text: str) -> Turn:
        tool = _TOOL.search(text)
        if tool:
            return await self._call_tool(tool.group(1).lower(), tool.group(2).strip())
        if _OPEN_TAG.search(text):
            return Turn(
                0.0,
                "Malformed tool call: close the tag, e.g. <calc>2*3</calc>.",
                metrics={"malformed_tool_call": 1},
            )
        if _ANSWER.search(text):
            value = parse_answer(text)
            self.correct = value == self.task.answer
            metrics = {"correct": float(self.correct), "unparsed_answer": float(value is None)}
            return Turn(
                float(self.correct), "Correct." if self.correct else "Incorrect.", done=True, metrics=metrics
            )
        return Turn(
            0.0,
            "Use <calc>...</calc> or <python>...</python>, or reply 'Answer: NUMBER'.",
            metrics={"format_error": 1},
        )

    async def _call_tool(self, kind: str, body: str) -> Turn:
        if not body:
            return Turn(0.0, f"Malformed tool call: empty <{kind}>.", metrics={"malformed_tool_call": 1})
        if self.tool_calls >= self.limits.max_tool_calls:
            return Turn(0.0, "Tool call limit reached.", done=True, stop_reason=StopReason.MAX_TOOL_CALLS)
        if self.sandbox is None:
            limits = SandboxLimits(wall_timeout_s=self.limits.tool_timeout_s)
            self.sandbox = await SubprocessSandbox.create(limits, base_dir=self.sandbox_dir)
        code = body if kind == "python" else f"print({body})"
        result = await self.sandbox.run_python(code, timeout=int(self.limits.tool_timeout_s))
        output = (result.stdout + result.stderr).strip()
        if len(output) > TOOL_OUTPUT_CHARS:
            output = output[:TOOL_OUTPUT_CHARS] + "\n... (output truncated)"
        if result.exit_code != 0:
            last = output.splitlines()[-1] if output else f"exit code {result.exit_code}"
            reply, failed = f"Tool error: {last}", 1.0
        else:
            reply, failed = f"Output:\n{output or '(nothing printed)'}", 0.0
        bonus = 0.0
        if not failed and not self.bonus_paid:
            bonus, self.bonus_paid = self.tool_bonus, True
        return Turn(bonus, reply, tool_calls=1, metrics={"tool_error": failed, f"tool/{kind}": 1.0})

    async def close(self) -> None:
        if self.sandbox is not None:
            sandbox, self.sandbox = self.sandbox, None
            await sandbox.cleanup()


def make_tasks(split: str, config: dict[str, Any]) -> list[WordProblem]:
    return make_problems(split, int(config["level"]), int(config["seed"]))


SPEC = EnvSpec(
    name="react_tools",
    limits=LIMITS,
    tools=("calc", "python"),
    config_keys=(
        ConfigKey(
            "level",
            1,
            "1 one operation, 2 two operations, 3 three or four on larger numbers",
            choices=(1, 2, 3),
        ),
        seed_key("problem"),
        DEMO_KEY,
        ConfigKey(
            "hint",
            0,
            "1 = the task ends with a nudge to call the calculator first (helps small models start)",
            choices=(0, 1),
        ),
        ConfigKey(
            "tool_bonus",
            0.0,
            "reward for the episode's first tool call that runs (curriculum shaping; once per episode)",
            minimum=0.0,
            maximum=MAX_TOOL_BONUS,
        ),
    ),
    make_tasks=make_tasks,
    make_env=lambda task, config: ReactToolsEnv(
        task,
        demo=bool(config.get("demo", 0)),
        hint=bool(config.get("hint", 0)),
        tool_bonus=float(config.get("tool_bonus", 0.0)),
    ),
)


@chz.chz
class ReactToolsDatasetBuilder(TreadleEnvDatasetBuilder):
    """`rl.train` dataset builder for the ReAct tool env (`env_config={"level": 1..3}`)."""

    env_name: str = "react_tools"
