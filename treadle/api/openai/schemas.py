"""Pydantic wire types of the OpenAI chat/completions requests, and the checks that keep them honest.

Every field OpenAI defines is either supported, accepted only at its no-op value (e.g. `presence_penalty: 0`),
or refused with a 400 naming it; unknown fields are refused too. Nothing is silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from treadle.errors import UserError

MAX_N = 64
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class FunctionDef(BaseModel):
    # Function schemas are free-form JSON Schema; keep any extra keys (e.g. `strict`) for the template.
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class ToolCallFunction(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    # `name` and provider-specific keys (e.g. `refusal`) are allowed on messages by OpenAI; keep them.
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class _SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str = Field(min_length=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's own abuse tracking; carries no behaviour
    # A conversation id; recorded with the trace when `model` is a deployment (treadle extension).
    session_id: str | None = Field(default=None, max_length=500)
    # Accepted only at the value that means "off"; anything else is refused in `check_noop_fields`.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise UserError(f"stop: at most {MAX_STOP} non-empty strings are allowed", field="stop")
        return stops


class ChatCompletionRequest(_SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None

    def token_limit(self) -> int | None:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise UserError(
                "max_tokens: give either max_tokens or max_completion_tokens, not both", field="max_tokens"
            )
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


_Req = TypeVar("_Req", bound=BaseModel)


def parse_request(model_cls: type[_Req], body: Any) -> _Req:
    """Validate a JSON body into `model_cls`, turning pydantic's error into a UserError naming the field."""
    if not isinstance(body, dict):
        raise UserError("body: must be a JSON object", field="body")
    try:
        req = model_cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or "body"
        if err["type"] == "extra_forbidden":
            raise UserError(f"{field}: this field is not supported by treadle", field=field) from None
        raise UserError(f"{field}: {err['msg']}", field=field) from None
    if isinstance(req, _SamplingFields):
        check_noop_fields(req)
    return req


def check_noop_fields(req: _SamplingFields) -> None:
    """Refuse fields that are accepted by OpenAI but not implemented here, unless set to their no-op value."""
    if req.presence_penalty != 0:
        raise UserError("presence_penalty: not supported; only 0 is accepted", field="presence_penalty")
    if req.frequency_penalty != 0:
        raise UserError("frequency_penalty: not supported; only 0 is accepted", field="frequency_penalty")
    if req.stream_options is not None and not req.stream:
        raise UserError("stream_options: only allowed with stream: true", field="stream_options")
    if req.logit_bias:
        raise UserError("logit_bias: not supported; omit it or pass {}", field="logit_bias")
    if isinstance(req, ChatCompletionRequest):
        fmt = (req.response_format or {}).get("type", "text")
        if fmt != "text":
            raise UserError(
                f"response_format: only type 'text' is supported, got {fmt!r}", field="response_format"
            )
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise UserError("echo: not supported; only false is accepted", field="echo")
        if req.suffix:
            raise UserError("suffix: not supported (no fill-in-the-middle)", field="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise UserError("best_of: not supported; omit it or set it equal to n", field="best_of")
