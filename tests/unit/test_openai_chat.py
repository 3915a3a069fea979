"""Chat rendering through the model's own template, end-of-turn detection, tool rendering and tool-call parsing,
on the real SmolLM2 tokenizer (and the same tokenizer given a Hermes-style tool template)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from treadle.api.openai.chat import end_of_turn_ids, parse_tool_calls, render_chat, supports_tools
from treadle.api.openai.images import chat_images
from treadle.api.openai.schemas import Message, Tool
from treadle.errors import UserError

# A Hermes/Qwen-style template: tools in the system turn, calls as <tool_call>{json}</tool_call>.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nYou may call these tools:\n<tools>\n"
    "{%- for tool in tools %}{{ tool | tojson }}\n{%- endfor %}</tools><|im_end|>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- if m.tool_calls %}{%- for c in m.tool_calls %}<tool_call>\n{{ {'name': c.function.name, "
    "'arguments': c.function.arguments} | tojson }}\n</tool_call>{%- endfor %}{%- endif %}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)

WEATHER = Tool.model_validate(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
)


@pytest.fixture(scope="module")
def smol_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))  # the real SmolLM2 tokenizer and chat template


@pytest.fixture(scope="module")
def tool_tokenizer(smol_tokenizer: Any) -> Any:
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = TOOL_TEMPLATE
    return tok


def _user(text: str) -> Message:
    return Message(role="user", content=text)


def test_render_uses_the_models_template_and_generation_prompt(smol_tokenizer):
    ids = render_chat(smol_tokenizer, [_user("What is the capital of France?")], None)
    expected = smol_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert smol_tokenizer.decode(ids) == expected
    assert expected.endswith("<|im_start|>assistant\n")


def test_developer_role_and_text_parts(smol_tokenizer):
    msgs = [
        Message.model_validate({"role": "developer", "content": "Be brief."}),
        Message.model_validate(
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}
        ),
    ]
    text = smol_tokenizer.decode(render_chat(smol_tokenizer, msgs, None))
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text
    assert "<|im_start|>user\nHi there<|im_end|>" in text


def test_non_text_parts_and_missing_content_name_the_field(smol_tokenizer):
    audio = Message.model_validate({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]})
    with pytest.raises(UserError) as e:
        render_chat(smol_tokenizer, [audio], None)
    assert e.value.field == "messages[0].content[0].type"
    # image_url parts take data URLs only (api/openai/images.py); the server fetches nothing
    img = Message.model_validate(
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    )
    with pytest.raises(UserError) as e:
        chat_images([img])
    assert e.value.field == "messages[0].content[0].image_url.url"
    with pytest.raises(UserError) as e:
        render_chat(smol_tokenizer, [_user("a"), Message(role="user")], None)
    assert e.value.field == "messages[1].content"


def test_end_of_turn_is_read_off_the_template(smol_tokenizer):
    assert end_of_turn_ids(smol_tokenizer) == [smol_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    plain = copy.deepcopy(smol_tokenizer)
    plain.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    assert end_of_turn_ids(plain) == []  # no special token closes the turn: EOS alone ends generation


def test_tools_need_a_template_that_renders_them(smol_tokenizer, tool_tokenizer):
    assert not supports_tools(smol_tokenizer) and supports_tools(tool_tokenizer)
    with pytest.raises(UserError) as e:
        render_chat(smol_tokenizer, [_user("weather?")], [WEATHER])
    assert e.value.field == "tools"
    text = tool_tokenizer.decode(render_chat(tool_tokenizer, [_user("weather in Paris?")], [WEATHER]))
    assert '"name": "get_weather"' in text and "Current weather in a city" in text


def test_assistant_tool_calls_are_rendered_with_object_arguments(tool_tokenizer):
    history = [
        _user("weather in Paris?"),
        Message.model_validate(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            }
        ),
        Message(role="tool", content="sunny", tool_call_id="call_1"),
    ]
    text = tool_tokenizer.decode(render_chat(tool_tokenizer, history, [WEATHER]))
    # Not double-encoded: the template's tojson sees a mapping, as HF templates expect.
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<|im_start|>tool\nsunny<|im_end|>" in text


def test_parse_hermes_tool_calls():
    text = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    content, calls = parse_tool_calls(text, {"get_weather"})
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_")


def test_parse_two_calls_and_an_unclosed_last_one():
    text = (
        '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": {"x": 1}}'  # generation hit max_tokens before the closing tag
    )
    content, calls = parse_tool_calls(text, {"a", "b"})
    assert content is None and [c.name for c in calls] == ["a", "b"]


def test_undeclared_or_malformed_calls_stay_in_the_content():
    for text in (
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
        "<tool_call>{not json}</tool_call>",
        '{"name": "rm_rf", "parameters": {}}',
        "Paris is the capital of France.",
    ):
        assert parse_tool_calls(text, {"get_weather"}) == (text, [])


def test_parse_bare_json_calls():
    content, calls = parse_tool_calls(
        ' {"name": "get_weather", "parameters": {"city": "Oslo"}}', {"get_weather"}
    )
    assert content is None and json.loads(calls[0].arguments) == {"city": "Oslo"}
    content, calls = parse_tool_calls(
        '[{"name": "get_weather", "arguments": {"city": "A"}}, {"name": "get_weather", "arguments": {"city": "B"}}]',
        {"get_weather"},
    )
    assert [json.loads(c.arguments)["city"] for c in calls] == ["A", "B"]


def test_no_tools_means_no_parsing():
    text = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    assert parse_tool_calls(text, set()) == (text, [])
