"""Chat messages → prompt tokens through the model's own chat template, and tool calls back out of the reply.

The template is the tokenizer's (`apply_chat_template`), so a fine-tuned adapter sees exactly the format it
was trained on. The end-of-turn token is read off the template itself rather than hard-coded per family.
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

from treadle.api.openai.schemas import Message, Tool
from treadle.errors import UserError

_PROBE = "treadle-end-of-turn-probe"
_TOOL_CALL_RE = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # a JSON string, as OpenAI sends it


def template_source(tokenizer: Any) -> str:
    tpl = getattr(tokenizer, "chat_template", None)
    if isinstance(tpl, dict):
        tpl = tpl.get("tool_use") or tpl.get("default")
    return tpl if isinstance(tpl, str) else ""


def supports_tools(tokenizer: Any) -> bool:
    """A template that never mentions `tools` would drop them without a word, so we only pass them to ones that do."""
    return "tools" in template_source(tokenizer)


def _content_text(msg: Message, i: int) -> str | None:
    if msg.content is None or isinstance(msg.content, str):
        return msg.content
    texts: list[str] = []
    for j, part in enumerate(msg.content):
        if part.type == "image_url":  # decoded by api/openai/images.py; the template renders a placeholder
            continue
        if part.type != "text" or part.text is None:
            raise UserError(
                f"messages[{i}].content[{j}].type: only 'text' and 'image_url' parts are supported, got {part.type!r}",
                field=f"messages[{i}].content[{j}].type",
            )
        texts.append(part.text)
    return "".join(texts)


def _template_content(msg: Message, text: str | None) -> str | list[dict[str, Any]]:
    """A message with images goes to the template as text / image parts (as vision templates expect)."""
    if isinstance(msg.content, str) or msg.content is None or all(p.type != "image_url" for p in msg.content):
        return text or ""
    return [
        {"type": "image"} if p.type == "image_url" else {"type": "text", "text": p.text} for p in msg.content
    ]


def _tool_call_for_template(call: Any) -> dict[str, Any]:
    # HF templates (Qwen, Hermes, Llama 3.1) render `arguments` with `tojson`, so they expect a mapping;
    # a string would come out double-encoded.
    try:
        args: Any = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        args = call.function.arguments
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": args}}


def template_messages(messages: list[Message], *, tools_ok: bool) -> list[dict[str, Any]]:
    """OpenAI messages → the plain dicts HF chat templates iterate over."""
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        text = _content_text(msg, i)
        if text is None and not (msg.role == "assistant" and msg.tool_calls):
            raise UserError(
                f"messages[{i}].content: required for role {msg.role!r}", field=f"messages[{i}].content"
            )
        # OpenAI's `developer` role replaces `system` for newer models; templates only know `system`.
        d: dict[str, Any] = {
            "role": "system" if msg.role == "developer" else msg.role,
            "content": _template_content(msg, text),
        }
        if msg.tool_calls:
            if not tools_ok:
                raise UserError(
                    f"messages[{i}].tool_calls: this model's chat template does not render tool calls",
                    field=f"messages[{i}].tool_calls",
                )
            d["tool_calls"] = [_tool_call_for_template(c) for c in msg.tool_calls]
        if msg.tool_call_id is not None:
            d["tool_call_id"] = msg.tool_call_id
        out.append(d)
    return out


def render_chat(tokenizer: Any, messages: list[Message], tools: list[Tool] | None) -> list[int]:
    """Prompt token ids for `messages` (+ `tools`), ending with the template's generation prompt."""
    tools_ok = supports_tools(tokenizer)
    if tools and not tools_ok:
        raise UserError("tools: this model's chat template does not support tools", field="tools")
    msgs = template_messages(messages, tools_ok=tools_ok)
    tool_dicts = [t.model_dump(exclude_none=True) for t in tools] if tools else None
    try:
        text = tokenizer.apply_chat_template(
            msgs, tools=tool_dicts, add_generation_prompt=True, tokenize=False
        )
    except Exception as e:  # jinja raises its own TemplateError (e.g. "roles must alternate")
        raise UserError(f"messages: the model's chat template rejected them: {e}", field="messages") from None
    # The template already wrote any BOS it wants; letting the tokenizer add another would double it.
    return list(tokenizer.encode(text, add_special_tokens=False))


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The special token the template closes an assistant turn with (`<|im_end|>`, `<|eot_id|>`, …), if any."""
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}], tokenize=False
        )
    except Exception:  # some templates refuse a conversation that ends with the assistant
        return []
    if not isinstance(text, str) or _PROBE not in text:
        return []
    after = text.split(_PROBE, 1)[1]
    ids = tokenizer.encode(after, add_special_tokens=False) if after else []
    special = set(getattr(tokenizer, "all_special_ids", [])) | set(
        getattr(tokenizer, "added_tokens_decoder", {})
    )
    return [int(ids[0])] if ids and ids[0] in special else []


def _call_from_obj(obj: Any, tool_names: set[str]) -> ParsedToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in tool_names:
        return None
    # Hermes/Qwen emit `arguments`; Llama 3.1's JSON tool format emits `parameters`.
    args = obj.get("arguments", obj.get("parameters", {}))
    args_json = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ParsedToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=str(obj["name"]), arguments=args_json)


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def parse_tool_calls(text: str, tool_names: set[str]) -> tuple[str | None, list[ParsedToolCall]]:
    """Split a reply into (content, tool calls). Only calls to declared tools count; anything that does
    not parse stays in the content, so a malformed call is visible to the user instead of lost."""
    if not tool_names:
        return text, []
    if "<tool_call>" in text:
        calls: list[ParsedToolCall] = []
        kept: list[str] = []
        pos = 0
        for m in _TOOL_CALL_RE.finditer(text):
            call = _call_from_obj(_json_or_none(m.group(1)), tool_names)
            if call is None:
                continue
            calls.append(call)
            kept.append(text[pos : m.start()])
            pos = m.end()
        kept.append(text[pos:])
        content = "".join(kept).strip()
        return (content or None) if calls else text, calls
    # Templates without a tool-call tag (e.g. Llama 3.1) make the whole reply one JSON object or a list of them.
    obj = _json_or_none(text.strip())
    objs = obj if isinstance(obj, list) else [obj]
    parsed = [_call_from_obj(o, tool_names) for o in objs]
    if objs and all(p is not None for p in parsed):
        return None, [p for p in parsed if p is not None]
    return text, []
