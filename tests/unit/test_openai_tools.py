"""Tools through the /v1 router on a real engine whose tokenizer carries a Hermes-style tool template, and the
wire shape of tool-call replies (plain and streamed) as the official `openai` client parses them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.unit.test_openai_chat import TOOL_TEMPLATE, WEATHER
from tests.unit.test_openai_routes import BASE, OneEngineBackend
from treadle.api.openai import make_router
from treadle.api.openai.chat import parse_tool_calls, render_chat
from treadle.api.openai.generation import GenerationSpec, finish_sequence
from treadle.api.openai.routes import chat_choice
from treadle.api.openai.schemas import Message
from treadle.api.openai.streaming import chat_chunks
from treadle.engine.engine import Engine
from treadle.engine.types import SampledSequence

AUTH = {"Authorization": "Bearer sk-alice"}
MSGS = [{"role": "user", "content": "Weather in Paris?"}]
TOOLS = [WEATHER.model_dump(exclude_none=True)]
CALL_TEXT = 'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[Engine]:
    e = Engine(str(tiny_model_dir))
    e.tokenizer.chat_template = TOOL_TEMPLATE  # this engine is private to the module
    yield e
    e.close()


@pytest.fixture(scope="module")
def http(engine: Engine) -> Iterator[TestClient]:
    app = FastAPI()
    app.include_router(make_router(OneEngineBackend(engine)))
    with TestClient(app) as c:
        yield c


def _chat(http: TestClient, **body: Any) -> Any:
    return http.post("/v1/chat/completions", json={"model": BASE, "max_tokens": 3, **body}, headers=AUTH)


def test_tools_are_rendered_into_the_prompt_unless_tool_choice_is_none(http, engine):
    msgs = [Message.model_validate(m) for m in MSGS]
    with_tools = _chat(http, messages=MSGS, tools=TOOLS)
    assert with_tools.status_code == 200, with_tools.text
    reply = ChatCompletion.model_validate(with_tools.json())
    assert reply.usage is not None and reply.usage.prompt_tokens == len(
        render_chat(engine.tokenizer, msgs, [WEATHER])
    )
    none = ChatCompletion.model_validate(_chat(http, messages=MSGS, tools=TOOLS, tool_choice="none").json())
    assert none.usage is not None and none.usage.prompt_tokens == len(
        render_chat(engine.tokenizer, msgs, None)
    )
    assert none.usage.prompt_tokens < reply.usage.prompt_tokens


def test_unenforceable_tool_choice_is_refused(http):
    resp = _chat(http, messages=MSGS, tools=TOOLS, tool_choice="required")
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "tool_choice"


def _tool_call_choice(engine: Engine) -> tuple[Any, tuple[str | None, list[Any]]]:
    ids = engine.tokenizer.encode(CALL_TEXT, add_special_tokens=False) + [2]
    spec = GenerationSpec([1], "messages", None, 0.0, 1.0, None, 1, [], [2], 0)
    choice = finish_sequence(engine.tokenizer, SampledSequence(ids, [-0.5] * len(ids), "stop"), spec)
    return choice, parse_tool_calls(choice.text, {"get_weather"})


def test_tool_call_reply_parses_as_openai_message(engine):
    choice, call = _tool_call_choice(engine)
    body = {"id": "x", "object": "chat.completion", "created": 0, "model": BASE}
    reply = ChatCompletion.model_validate({**body, "choices": [chat_choice(engine, 0, choice, call, False)]})
    msg = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and msg.content == "Checking."
    assert msg.tool_calls is not None and len(msg.tool_calls) == 1
    fn = msg.tool_calls[0].function  # type: ignore[union-attr]
    assert fn.name == "get_weather" and json.loads(fn.arguments) == {"city": "Paris"}


def test_streamed_tool_call_merges_to_the_same_call(engine):
    choice, call = _tool_call_choice(engine)
    head = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": BASE}
    chunks = [
        ChatCompletionChunk.model_validate(c)
        for c in chat_chunks(head, engine.tokenizer, [choice], [call], logprobs=False, usage=None)
    ]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    deltas = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert content == "Checking."
    assert [(d.index, d.id, d.function.name if d.function else None) for d in deltas] == [
        (0, call[1][0].id, "get_weather")
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
