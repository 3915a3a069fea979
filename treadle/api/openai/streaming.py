"""Server-sent events for `stream: true`, then `[DONE]`.

Two sources: live deltas (`live.LiveGeneration`, tokens as they are drawn; the default) and finished choices
replayed as token-aligned chunks (when the reply must be complete first: tool calls, top-k logprobs). Either
way the concatenated deltas are byte-for-byte the non-streaming text (same request, same seed, temperature 0).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from treadle.api.openai.chat import ParsedToolCall
from treadle.api.openai.generation import Choice
from treadle.api.openai.live import LiveGeneration
from treadle.api.openai.responses import chat_logprobs, completion_logprobs, error_body, tool_calls_json
from treadle.errors import TreadleError

log = logging.getLogger(__name__)
_DONE = b"data: [DONE]\n\n"


def _event(chunk: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()


def sse_response(chunks: Iterable[dict[str, Any]]) -> StreamingResponse:
    def events() -> Iterator[bytes]:
        for chunk in chunks:
            yield _event(chunk)
        yield _DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class _LiveSSE(StreamingResponse):
    """Cancels the generation however the response ends: Starlette stops sending when the client disconnects
    (abandoning the body iterator), so the cancel cannot live in the iterator alone."""

    def __init__(self, body: AsyncIterator[bytes], live: LiveGeneration) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._live = live

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._live.cancel()


def live_sse_response(live: LiveGeneration, chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Stream `chunks` as they come. A failure after the first byte can no longer change the status code, so it
    goes out as an OpenAI error event (the official client raises it) and the stream ends without `[DONE]`."""

    async def events() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield _event(chunk)
        except TreadleError as e:
            yield _event(error_body(e))
            return
        except Exception as e:
            log.exception("openai api: generation failed mid-stream")
            yield _event(error_body(TreadleError(f"internal error: {type(e).__name__}: {e}")))
            return
        finally:
            live.cancel()
        yield _DONE

    return _LiveSSE(events(), live)


def _usage(live: LiveGeneration) -> dict[str, int]:
    return {
        "prompt_tokens": live.prompt_tokens,
        "completion_tokens": live.completion_tokens,
        "total_tokens": live.prompt_tokens + live.completion_tokens,
    }


async def live_chat_chunks(
    head: dict[str, Any], tokenizer: Any, live: LiveGeneration, *, logprobs: bool, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    """chat.completion.chunk events as tokens arrive: a role chunk per choice, content deltas, a finish chunk."""

    def chunk(index: int, delta: dict[str, Any], lp: dict[str, Any] | None = None, finish: str | None = None):
        return {
            **head,
            "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}],
        }

    for i in range(live.num_choices):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for d in live.deltas():
        if d.finish is not None:
            yield chunk(d.index, {}, finish=d.finish)
            continue
        lp = chat_logprobs(tokenizer, d.choice, d.start, d.stop) if logprobs else None
        yield chunk(d.index, {"content": d.text}, lp)
    if include_usage:
        yield {**head, "choices": [], "usage": _usage(live)}


async def live_completion_chunks(
    head: dict[str, Any], tokenizer: Any, live: LiveGeneration, *, logprobs: bool, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    """text_completion events as tokens arrive, each choice closed by an empty-text chunk with its finish."""
    async for d in live.deltas():
        lp = (
            completion_logprobs(tokenizer, d.choice, d.start, d.stop)
            if logprobs and d.finish is None
            else None
        )
        choice = {"index": d.index, "text": d.text, "logprobs": lp, "finish_reason": d.finish}
        yield {**head, "choices": [choice]}
    if include_usage:
        yield {**head, "choices": [], "usage": _usage(live)}


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
