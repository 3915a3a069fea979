"""Finished choices → OpenAI response JSON (chat.completion, text_completion, logprobs, usage, errors)."""

from __future__ import annotations

from typing import Any

from treadle.api.openai.chat import ParsedToolCall
from treadle.api.openai.generation import Choice, token_text
from treadle.errors import TreadleError


def error_body(err: TreadleError) -> dict[str, Any]:
    """OpenAI's error shape: the official client raises a typed exception and shows `message`."""
    kind = {401: "authentication_error", 404: "invalid_request_error"}.get(err.status_code)
    if kind is None:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
    code = "model_not_found" if err.status_code == 404 and err.field == "model" else None
    if err.status_code == 401:
        code = "invalid_api_key"
    return {"error": {"message": err.message, "type": kind, "param": err.field, "code": code}}


def usage(prompt_tokens: int, choices: list[Choice]) -> dict[str, int]:
    completion = sum(c.num_generated for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def _token_entry(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    text = token_text(tokenizer, token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(tokenizer: Any, c: Choice, start: int = 0, stop: int | None = None) -> dict[str, Any]:
    """`choices[i].logprobs` of a chat completion for tokens [start, stop)."""
    stop = len(c.token_ids) if stop is None else stop
    content: list[dict[str, Any]] = []
    for j in range(start, stop):
        entry = _token_entry(tokenizer, c.token_ids[j], c.logprobs[j])
        tops = c.top_logprobs[j] if c.top_logprobs is not None else []
        entry["top_logprobs"] = [_token_entry(tokenizer, t, lp) for t, lp in tops]
        content.append(entry)
    return {"content": content, "refusal": None}


def completion_logprobs(tokenizer: Any, c: Choice, start: int = 0, stop: int | None = None) -> dict[str, Any]:
    """The legacy completions `logprobs` object for tokens [start, stop); offsets are relative to the text."""
    stop = len(c.token_ids) if stop is None else stop
    idx = range(start, stop)
    tops = None
    if c.top_logprobs is not None:
        tops = [{token_text(tokenizer, t): lp for t, lp in c.top_logprobs[j]} for j in idx]
    return {
        "tokens": [token_text(tokenizer, c.token_ids[j]) for j in idx],
        "token_logprobs": [c.logprobs[j] for j in idx],
        "top_logprobs": tops,
        "text_offset": [c.end_offsets[j - 1] if j else 0 for j in idx],
    }


def tool_calls_json(calls: list[ParsedToolCall], *, with_index: bool = False) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for k, call in enumerate(calls):
        d: dict[str, Any] = {
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        if with_index:
            d = {"index": k, **d}  # streaming deltas are merged by index
        out.append(d)
    return out
