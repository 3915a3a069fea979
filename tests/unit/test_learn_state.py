"""The learner's state file, trace stream cursor, gate arithmetic and the simulated users' independence."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import pytest
from tinker import types

import treadle.learn.simulate as simulate
from treadle.learn.batch import sft_datum
from treadle.learn.gate import end_of_turn_ids, gate_passes, load_gate_set, mean_token_logprob
from treadle.learn.state import Decision, LearnState, ModelInfo, Watch, format_status, load_state, save_state
from treadle.learn.traces import TraceStream


def test_state_round_trips_and_status_shows_decisions_with_numbers(tmp_path: Path) -> None:
    st = LearnState(deployment="agent", cursor=7, consumed=[9], step=4, cycle=2)
    st.models["tinker://r/sampler_weights/c1"] = ModelInfo(
        step=2, state_path="tinker://r/weights/c1", gate=-1.25
    )
    st.watch = Watch(version=3, previous_version=2, previous_model_path="base")
    st.add_reward(2, 0.25)
    st.add_reward(2, 0.75)
    st.log(Decision(2, "promote", "gate -1.2 vs live -1.3", {"gate": -1.2, "rl_datums": 5}, 3, "tinker://x"))
    path = tmp_path / "s" / "agent.json"
    save_state(path, st)
    back = load_state(path, "agent")
    assert back == st
    assert back.mean_reward(2) == (2, 0.5)
    assert back.mean_reward(9) == (0, None)
    text = format_status(back)
    assert "promote" in text and "gate=-1.2" in text and "rl_datums=5" in text
    assert "v2: 0.500 (n=2)" in text
    with pytest.raises(ValueError, match="belongs to deployment 'agent'"):
        load_state(path, "other")
    assert load_state(tmp_path / "missing.json", "new") == LearnState(deployment="new")


class _Traces:
    """The list route's filter semantics over an in-memory list (the stream's cursor logic is what is tested)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def list_traces(
        self,
        deployment: str,
        *,
        after_seq: int = 0,
        has_feedback: bool | None = None,
        version: int | None = None,
        limit: int = 500,
    ) -> tuple[list[dict[str, Any]], int]:
        rows = [r for r in self.rows if r["seq"] > after_seq]
        if has_feedback is not None:
            rows = [r for r in rows if bool(r["feedback"]) == has_feedback]
        rows = rows[:limit]
        return [dict(r) for r in rows], (rows[-1]["seq"] if rows else after_seq)


def test_stream_hands_out_each_trace_once_and_waits_for_late_feedback() -> None:
    src = _Traces()
    now = [0.0]
    stream = TraceStream(src, "agent", feedback_wait_s=10.0, clock=lambda: now[0])
    src.rows += [{"seq": s, "feedback": []} for s in (1, 2, 3)]
    assert stream.poll() == []
    src.rows[1]["feedback"] = [{"reward": 1.0}]  # seq 2 rated
    assert [t["seq"] for t in stream.poll()] == [2]
    assert stream.cursor == 0  # seq 1 still waits
    now[0] = 5.0
    src.rows[0]["feedback"] = [{"reward": 0.0}]  # late feedback for seq 1
    src.rows.append({"seq": 4, "feedback": [{"rating": 1}]})
    assert [t["seq"] for t in stream.poll()] == [1, 4]
    assert stream.cursor == 2 and stream.consumed == {4}
    now[0] = 16.0  # seq 3 waited past feedback_wait_s without feedback: given up
    assert stream.poll() == []
    assert (stream.cursor, stream.unrated) == (4, 1)
    # a restarted stream at the saved cursor hands out nothing twice
    again = TraceStream(src, "agent", cursor=stream.cursor, consumed=stream.consumed, clock=lambda: now[0])
    assert again.poll() == []


def test_stream_in_rule_mode_hands_out_unrated_traces_after_the_wait() -> None:
    src = _Traces()
    now = [0.0]
    stream = TraceStream(src, "agent", feedback_wait_s=0.0, hand_out_unrated=True, clock=lambda: now[0])
    src.rows.append({"seq": 1, "feedback": []})
    assert [t["seq"] for t in stream.poll()] == [1]


def test_gate_score_is_weighted_mean_token_logprob() -> None:
    datums = [sft_datum([1, 2], [3], [0]), sft_datum([1], [4, 5], [0])]
    outs = [
        {"logprobs": types.TensorData(data=[-9.0, -1.0, -2.0], dtype="float32", shape=[3])},
        {"logprobs": types.TensorData(data=[-3.0, -4.0, -5.0], dtype="float32", shape=[3])},
    ]
    # weighted positions: (-1, -2) and (-3, -4, -5): the prompt's -9 does not count
    assert mean_token_logprob(datums, outs) == pytest.approx(-15.0 / 5)
    assert gate_passes(-1.04, -1.0, 0.05) and not gate_passes(-1.06, -1.0, 0.05)


def test_gate_set_renders_prompts_with_the_template_and_ends_with_end_of_turn(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eot = end_of_turn_ids(tok)
    assert eot == [tok.convert_tokens_to_ids("<|im_end|>")]
    path = tmp_path / "gate.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "Capital of Peru?"}], "completion": "Lima."}\n'
    )
    (d,) = load_gate_set(path, tok, eot)
    ids = d.model_input.to_ints() + [d.loss_fn_inputs["target_tokens"].tolist()[-1]]
    assert tok.decode(ids).endswith("<|im_start|>assistant\nLima.<|im_end|>")
    path.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="gate_set line 1"):
        load_gate_set(path, tok, eot)


def test_simulated_users_are_independent_of_the_learner() -> None:
    tree = ast.parse(inspect.getsource(simulate))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m.startswith("treadle") for m in imported), imported
    assert simulate.hidden_reward("Paris.", "stop", 12) == 1.0
    assert simulate.hidden_reward("word " * 24, "stop", 12) == 0.5
    assert simulate.hidden_reward("Paris", "length", 12) == 0.0
