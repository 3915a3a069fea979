"""The OpenAI-compatible endpoints: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`.

Thin: authenticate → validate → resolve the model → generate through the engine's shared sampler → encode.
Every error leaves as OpenAI's `{"error": {...}}` shape so the official client raises the right exception.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from treadle.api.openai.admission import hold_tokens
from treadle.api.openai.backend import OpenAIBackend
from treadle.api.openai.chat import end_of_turn_ids, parse_tool_calls, render_chat
from treadle.api.openai.generation import Choice, GenerationSpec, generate
from treadle.api.openai.images import chat_images, expand_chat_images, refuse_unless_vision
from treadle.api.openai.live import LiveGeneration
from treadle.api.openai.responses import (
    chat_logprobs,
    completion_logprobs,
    error_body,
    tool_calls_json,
    usage,
)
from treadle.api.openai.schemas import ChatCompletionRequest, CompletionRequest, parse_request
from treadle.api.openai.streaming import (
    chat_chunks,
    completion_chunks,
    live_chat_chunks,
    live_completion_chunks,
    live_sse_response,
    sse_response,
)
from treadle.api.openai.tracing import Clock, DeploymentGateway, records, tag, then
from treadle.errors import NotFoundError, TreadleError, UserError

if TYPE_CHECKING:
    from treadle.api.openai.backend import ServedModel
    from treadle.service.deployments import DeploymentTarget

log = logging.getLogger(__name__)


async def _guarded(handler: Callable[[], Awaitable[Response]]) -> Response:
    try:
        return await handler()
    except TreadleError as e:
        # a limit (429): the openai client waits Retry-After, then retries
        retry_after = getattr(e, "retry_after_s", None)
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
        return JSONResponse(error_body(e), status_code=e.status_code, headers=headers)
    except Exception as e:  # a bug must still reach the client in OpenAI's shape, not as a bare 500 page
        log.exception("openai api: unexpected error")
        err = TreadleError(f"internal error: {type(e).__name__}: {e}")
        return JSONResponse(error_body(err), status_code=500)


async def _json_body(request: Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError("body: must be valid JSON", field="body") from None


async def _resolve(backend: OpenAIBackend, model: str, owner: str) -> tuple[ServedModel, str | None]:
    try:
        return await backend.resolve(model, owner)
    except NotFoundError as e:
        served = ", ".join(backend.served_models(owner)) or "none"
        raise NotFoundError(
            f"model: {e.message.removeprefix('model: ')}. Served models: {served}; a trained adapter is addressed by its "
            "tinker://…/sampler_weights/… or …/weights/… path",
            field="model",
        ) from None


async def _resolve_any(
    backend: OpenAIBackend, deployments: DeploymentGateway | None, model: str, owner: str
) -> tuple[ServedModel, str | None, DeploymentTarget | None]:
    """A served base model, one of the caller's deployments (its live version, fixed for this request), or a
    checkpoint path; an unknown name is a 404 listing the served models and the caller's deployments."""
    if deployments is None or model in backend.served_models(owner):
        return (*await _resolve(backend, model, owner), None)
    target = await deployments.lookup(model, owner)
    if target is not None:
        return target.engine, target.adapter_id, target
    try:
        return (*await _resolve(backend, model, owner), None)
    except NotFoundError as e:
        mine = ", ".join(deployments.names(owner)) or "none"
        raise NotFoundError(f"{e.message}; your deployments: {mine}", field="model") from None


def _head(prefix: str, obj: str, model: str) -> dict[str, Any]:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()), "model": model}


def _stop_ids(engine: ServedModel, *, chat: bool) -> list[int]:
    ids = end_of_turn_ids(engine.tokenizer) if chat else []
    return ids + [t for t in engine.info.eos_token_ids if t not in ids]


async def chat_completions(
    backend: OpenAIBackend, request: Request, deployments: DeploymentGateway | None = None
) -> Response:
    clock = Clock()
    owner = backend.authenticate(request.headers.get("authorization"))
    raw = await _json_body(request)
    req = parse_request(ChatCompletionRequest, raw)
    if req.top_logprobs and not req.logprobs:
        raise UserError("top_logprobs: requires logprobs: true", field="top_logprobs")
    engine, adapter_id, target = await _resolve_any(backend, deployments, req.model, owner)
    # tool_choice "none" means the model must answer in prose: don't offer the tools at all.
    tools = req.tools if req.tool_choice != "none" else None
    images = chat_images(req.messages)
    refuse_unless_vision(engine, images)
    prompt, spans = expand_chat_images(engine, render_chat(engine.tokenizer, req.messages, tools), images)
    spec = GenerationSpec(
        prompt=prompt,
        spans=spans,
        prompt_field="messages",
        max_tokens=req.token_limit(),
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        n=req.n,
        stop_strings=req.stop_strings(),
        stop_token_ids=_stop_ids(engine, chat=True),
        top_logprobs=req.top_logprobs or 0,
    )
    names = {t.function.name for t in tools or []}
    want_usage = req.stream_options is not None and req.stream_options.include_usage
    # Live unless the reply must be whole first: a tool call is only recognisable once complete, and top-k
    # alternatives come from re-scoring the finished reply.
    if req.stream and not names and spec.top_logprobs == 0:
        head = _head("chatcmpl", "chat.completion.chunk", req.model)
        live = await _live(backend, owner, engine, adapter_id, [spec])
        clock.mark_submitted()
        chunks = live_chat_chunks(
            head, engine.tokenizer, live, logprobs=req.logprobs, include_usage=want_usage
        )
        if deployments is not None and target is not None:
            chunks = then(
                chunks, _live_recorder(deployments, target, head["id"], "chat", raw, [spec], live, clock)
            )
        return tag(live_sse_response(live, chunks), target)
    release = await hold_tokens(backend, owner, engine, [spec])
    clock.mark_submitted()
    try:
        choices = await generate(engine, adapter_id, spec, clock.on_token if target is not None else None)
    finally:
        release()
    calls = [parse_tool_calls(c.text, names) for c in choices]
    if not req.parallel_tool_calls:
        calls = [(content, found[:1]) for content, found in calls]
    head = _head("chatcmpl", "chat.completion", req.model)
    use = usage(len(spec.prompt), choices)
    if deployments is not None and target is not None:
        found = dict(enumerate(choices))
        await deployments.record(target, records(head["id"], "chat", raw, [spec], found, clock))
    if req.stream:
        head["object"] = "chat.completion.chunk"
        return tag(
            sse_response(
                chat_chunks(
                    head,
                    engine.tokenizer,
                    choices,
                    calls,
                    logprobs=req.logprobs,
                    usage=use if want_usage else None,
                )
            ),
            target,
        )
    body = {
        **head,
        "choices": [chat_choice(engine, i, c, calls[i], req.logprobs) for i, c in enumerate(choices)],
        "usage": use,
    }
    return tag(JSONResponse(body), target)


async def _live(
    backend: OpenAIBackend,
    owner: str,
    engine: ServedModel,
    adapter_id: str | None,
    specs: list[GenerationSpec],
) -> LiveGeneration:
    """Wait for sampling room, then submit (bad input is a 4xx, not a stream); the tokens are held until every
    request of the stream stops generating, however the stream ends."""
    release = await hold_tokens(backend, owner, engine, specs)
    try:
        live = LiveGeneration(engine, adapter_id, specs)
    except BaseException:
        release()
        raise
    live.when_done(release)
    return live


def _live_recorder(
    deployments: DeploymentGateway,
    target: DeploymentTarget,
    completion_id: str,
    endpoint: str,
    raw: dict[str, Any],
    specs: list[GenerationSpec],
    live: LiveGeneration,
    clock: Clock,
) -> Callable[[], Awaitable[None]]:
    """Store a live stream's traces once every choice has finished, before `[DONE]` goes out."""

    async def record() -> None:
        clock.first_token = live.first_token_at
        await deployments.record(target, records(completion_id, endpoint, raw, specs, live.finals, clock))

    return record


def chat_choice(engine: ServedModel, i: int, c: Choice, call: tuple[str | None, list[Any]], logprobs: bool):
    content, found = call
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if found:
        message["tool_calls"] = tool_calls_json(found)
    return {
        "index": i,
        "message": message,
        "logprobs": chat_logprobs(engine.tokenizer, c) if logprobs else None,
        "finish_reason": "tool_calls" if found else c.finish_reason,
    }


def _completion_prompts(
    prompt: str | list[str] | list[int] | list[list[int]], tokenizer: Any
) -> list[list[int]]:
    """OpenAI's four prompt shapes (text, texts, token ids, lists of token ids) → token-id prompts."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise UserError("prompt: must not be empty", field="prompt")
    out: list[list[int]] = []
    for k, item in enumerate(items):
        ids = list(tokenizer.encode(item)) if isinstance(item, str) else list(item)
        if not ids:
            raise UserError(f"prompt[{k}]: must not be empty", field="prompt")
        out.append(ids)
    return out


async def completions(
    backend: OpenAIBackend, request: Request, deployments: DeploymentGateway | None = None
) -> Response:
    clock = Clock()
    owner = backend.authenticate(request.headers.get("authorization"))
    raw = await _json_body(request)
    req = parse_request(CompletionRequest, raw)
    engine, adapter_id, target = await _resolve_any(backend, deployments, req.model, owner)
    vocab = engine.info.vocab_size
    prompts = _completion_prompts(req.prompt, engine.tokenizer)
    for ids in prompts:
        if any(not 0 <= t < vocab for t in ids):
            raise UserError(f"prompt: token ids must be in 0..{vocab - 1}", field="prompt")
    specs = [
        GenerationSpec(
            prompt=ids,
            prompt_field="prompt",
            max_tokens=req.max_tokens if req.max_tokens is not None else 16,  # OpenAI's completions default
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            n=req.n,
            stop_strings=req.stop_strings(),
            stop_token_ids=_stop_ids(engine, chat=False),
            top_logprobs=req.logprobs or 0,
        )
        for ids in prompts
    ]
    want_lp = req.logprobs is not None
    want_usage = req.stream_options is not None and req.stream_options.include_usage
    if (
        req.stream and not req.logprobs
    ):  # logprobs > 0 asks for top-k alternatives: those need the whole reply
        head = _head("cmpl", "text_completion", req.model)
        live = await _live(backend, owner, engine, adapter_id, specs)
        clock.mark_submitted()
        chunks = live_completion_chunks(
            head, engine.tokenizer, live, logprobs=want_lp, include_usage=want_usage
        )
        if deployments is not None and target is not None:
            chunks = then(
                chunks,
                _live_recorder(deployments, target, head["id"], "completions", raw, specs, live, clock),
            )
        return tag(live_sse_response(live, chunks), target)
    # All prompts go to the sampler at once so they are decoded in the same continuous batch.
    release = await hold_tokens(backend, owner, engine, specs)
    clock.mark_submitted()
    on_token = clock.on_token if target is not None else None
    try:
        per_prompt = await asyncio.gather(*(generate(engine, adapter_id, s, on_token) for s in specs))
    finally:
        release()
    choices = [c for cs in per_prompt for c in cs]
    head = _head("cmpl", "text_completion", req.model)
    use = usage(sum(len(p) for p in prompts), choices)
    if deployments is not None and target is not None:
        found = dict(enumerate(choices))
        await deployments.record(target, records(head["id"], "completions", raw, specs, found, clock))
    if req.stream:
        return tag(
            sse_response(
                completion_chunks(
                    head, engine.tokenizer, choices, logprobs=want_lp, usage=use if want_usage else None
                )
            ),
            target,
        )
    body = {
        **head,
        "choices": [
            {
                "index": i,
                "text": c.text,
                "logprobs": completion_logprobs(engine.tokenizer, c) if want_lp else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ],
        "usage": use,
    }
    return tag(JSONResponse(body), target)


def _model_card(name: str, owned_by: str = "treadle") -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": owned_by}


def make_router(backend: OpenAIBackend, deployments: DeploymentGateway | None = None) -> APIRouter:
    """The `/v1` router; mount it on the same app as the Tinker API (`app.include_router(make_router(b))`).
    With `deployments`, `model` may also name one of the caller's deployments (served and traced)."""
    router = APIRouter(prefix="/v1", tags=["openai"])

    @router.get("/models")
    async def list_models(request: Request) -> Response:
        async def handler() -> Response:
            owner = backend.authenticate(request.headers.get("authorization"))
            data = [_model_card(m) for m in backend.served_models(owner)]
            if deployments is not None:
                names = await asyncio.to_thread(deployments.names, owner)
                data += [_model_card(m, "deployment") for m in names]
            return JSONResponse({"object": "list", "data": data})

        return await _guarded(handler)

    @router.get("/models/{model:path}")
    async def retrieve_model(model: str, request: Request) -> Response:
        async def handler() -> Response:
            owner = backend.authenticate(request.headers.get("authorization"))
            _, _, target = await _resolve_any(backend, deployments, model, owner)
            return JSONResponse(_model_card(model, "deployment" if target is not None else "treadle"))

        return await _guarded(handler)

    @router.post("/chat/completions")
    async def chat(request: Request) -> Response:
        return await _guarded(lambda: chat_completions(backend, request, deployments))

    @router.post("/completions")
    async def complete(request: Request) -> Response:
        return await _guarded(lambda: completions(backend, request, deployments))

    return router
