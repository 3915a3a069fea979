"""Server-sent events for `stream: true`: finished choices replayed as token-aligned chunks, then `[DONE]`.

The sampler hands back whole sequences, so a stream is the finished sample cut at token boundaries: its
concatenated deltas are byte-for-byte the non-streaming text (same request, same seed, temperature 0).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi.responses import StreamingResponse

from treadle.api.openai.chat import ParsedToolCall
from treadle.api.openai.generation import Choice
from treadle.api.openai.responses import chat_logprobs, completion_logprobs, tool_calls_json


def sse_response(chunks: Iterable[dict[str, Any]]) -> StreamingResponse:
    def events() -> Iterator[bytes]:
        for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def token_pieces(c: Choice) -> list[tuple[int, str]]:
    """(token index, text delta) per token; the deltas concatenate to `c.text` exactly."""
    pieces: list[tuple[int, str]] = []
    start = 0
    for j, end in enumerate(c.end_offsets):
        pieces.append((j, c.text[start:end]))
        start = end
    return pieces


def chat_chunks(
    head: dict[str, Any],
    tokenizer: Any,
    choices: list[Choice],
    tool_calls: list[tuple[str | None, list[ParsedToolCall]]],
    *,
    logprobs: bool,
    usage: dict[str, int] | None,
) -> Iterator[dict[str, Any]]:
    """`head` carries id/object/created/model; `usage` (when the client asked for it) comes last with no choices."""

    def chunk(index: int, delta: dict[str, Any], lp: dict[str, Any] | None = None, finish: str | None = None):
        return {
            **head,
            "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}],
        }

    for i, c in enumerate(choices):
        yield chunk(i, {"role": "assistant", "content": ""})
        content, calls = tool_calls[i]
        if calls:
            # The reply was a tool call: stream what OpenAI would, the leftover content and then the calls.
            if content:
                yield chunk(i, {"content": content})
            yield chunk(i, {"tool_calls": tool_calls_json(calls, with_index=True)})
            yield chunk(i, {}, finish="tool_calls")
            continue
        for j, piece in token_pieces(c):
            lp = chat_logprobs(tokenizer, c, j, j + 1) if logprobs else None
            yield chunk(i, {"content": piece}, lp)
        yield chunk(i, {}, finish=c.finish_reason)
    if usage is not None:
        yield {**head, "choices": [], "usage": usage}


def completion_chunks(
    head: dict[str, Any],
    tokenizer: Any,
    choices: list[Choice],
    *,
    logprobs: bool,
    usage: dict[str, int] | None,
) -> Iterator[dict[str, Any]]:
    for i, c in enumerate(choices):
        for j, piece in token_pieces(c):
            lp = completion_logprobs(tokenizer, c, j, j + 1) if logprobs else None
            yield {**head, "choices": [{"index": i, "text": piece, "logprobs": lp, "finish_reason": None}]}
        yield {
            **head,
            "choices": [{"index": i, "text": "", "logprobs": None, "finish_reason": c.finish_reason}],
        }
    if usage is not None:
        yield {**head, "choices": [], "usage": usage}
