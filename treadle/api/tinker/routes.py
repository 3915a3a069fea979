"""The Tinker routes under `/api/v1` (protocol §2–§11): decode the request, call the service, encode.

Bodies are read as JSON objects through `Fields`, which names the offending field in every error.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse

from treadle.api.errors import error_response
from treadle.api.tinker import codec
from treadle.engine.types import AdamParams, LoraConfig, SampleRequest
from treadle.errors import UserError
from treadle.service.paths import CheckpointRef
from treadle.service.tinker_service import TinkerService
from treadle.store import KINDS, check_name

T = TypeVar("T")
_MISSING = object()


class Fields:
    """Typed access to a JSON object body."""

    def __init__(self, raw: object) -> None:
        if not isinstance(raw, dict):
            raise UserError("body: must be a JSON object", field="body")
        self.raw: dict[str, Any] = raw

    def get(self, name: str, typ: type[T] | tuple[type, ...], default: Any = _MISSING) -> T:
        v = self.raw.get(name, _MISSING)
        if v is _MISSING or v is None:
            if default is _MISSING:
                raise UserError(f"{name}: required", field=name)
            return default
        types = typ if isinstance(typ, tuple) else (typ,)
        if float in types and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            names = " or ".join(t.__name__ for t in types)
            raise UserError(f"{name}: must be {names}, got {type(v).__name__}", field=name)
        return v  # type: ignore[return-value]


async def fields(request: Request) -> Fields:
    body = await request.body()
    try:
        return Fields(json.loads(body) if body else {})
    except json.JSONDecodeError as e:
        raise UserError(f"body: not valid JSON ({e.msg} at position {e.pos})", field="body") from e


def future(request_id: str, model_id: str | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"request_id": request_id, **extra}
    if model_id is not None:
        out["model_id"] = model_id
    return out


def make_router(service: TinkerService) -> APIRouter:
    r = APIRouter(prefix="/api/v1")

    def owner(request: Request) -> str:
        return service.auth.owner(request.headers.get("x-api-key"))

    # ---- client start-up and sessions (protocol §2, §3) ----------------------------------------------
    @r.post("/client/config")
    async def client_config(request: Request) -> dict[str, Any]:
        owner(request)
        # Plain httpx instead of pyqwest: simpler over plain HTTP and the SDK's own default for config.
        return {"use_pyqwest_transport": False, "proto_compress_fwdbwd": False, "pjwt_auth_enabled": False}

    @r.post("/client/dynamic_config")
    async def dynamic_config(request: Request) -> dict[str, Any]:
        owner(request)
        return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}

    @r.post("/create_session")
    async def create_session(request: Request) -> dict[str, Any]:
        who, f = owner(request), await fields(request)
        sid = service.create_session(who, f.get("tags", list, []), f.get("user_metadata", dict, {}))
        return {"session_id": sid, "type": "create_session"}

    @r.post("/session_heartbeat")
    async def heartbeat(request: Request) -> dict[str, Any]:
        who, f = owner(request), await fields(request)
        service.heartbeat(who, f.get("session_id", str))
        return {"type": "session_heartbeat"}

    @r.post("/sessions/{session_id}/finish")
    async def finish(session_id: str, request: Request) -> dict[str, Any]:
        await service.finish_session(owner(request), session_id)
        return {}

    @r.get("/sessions")
    async def list_sessions(
        request: Request, limit: int = 20, offset: int = 0, status: str | None = None
    ) -> dict[str, Any]:
        if status is not None and status not in ("active", "finished", "expired"):
            raise UserError("status: must be one of active, finished, expired", field="status")
        return {"sessions": service.list_sessions(owner(request), status, limit, offset)}

    @r.get("/sessions/{session_id}")
    async def get_session(session_id: str, request: Request) -> dict[str, Any]:
        return service.get_session(owner(request), session_id)

    @r.post("/telemetry")
    async def telemetry() -> dict[str, Any]:
        return {"status": "accepted"}

    @r.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @r.get("/get_server_capabilities")
    async def capabilities() -> dict[str, Any]:
        return {"supported_models": service.capabilities()}

    # ---- training (protocol §5) -----------------------------------------------------------------------
    @r.post("/create_model")
    async def create_model(request: Request) -> dict[str, Any]:
        who, f = owner(request), await fields(request)
        lc = Fields(f.get("lora_config", dict, {"rank": 32}))
        lora = LoraConfig(
            rank=lc.get("rank", int, 32),
            seed=lc.get("seed", int, None),
            train_attn=lc.get("train_attn", bool, True),
            train_mlp=lc.get("train_mlp", bool, True),
            train_unembed=lc.get("train_unembed", bool, True),
        )
        opt = f.get("optimizer_config", dict, {"type": "adamw"})
        if opt.get("type", "adamw") != "adamw":
            raise UserError(
                f"optimizer_config.type: only 'adamw' is supported, got {opt.get('type')!r}",
                field="optimizer_config.type",
            )
        rid, mid = service.create_model(
            who,
            f.get("session_id", str),
            f.get("model_seq_id", int),
            f.get("base_model", str),
            lora,
            f.get("user_metadata", dict, {}),
        )
        return future(rid, mid)

    @r.post("/get_info")
    async def get_info(request: Request) -> dict[str, Any]:
        who, f = owner(request), await fields(request)
        return service.get_info(who, f.get("model_id", str))

    @r.post("/forward_backward")
    async def forward_backward(request: Request) -> dict[str, Any]:
        who = owner(request)
        if request.headers.get("content-encoding", "identity") not in ("identity", ""):
            raise UserError(
                "Content-Encoding: compressed forward_backward bodies are not enabled on this server",
                field="Content-Encoding",
            )
        ctype = request.headers.get("content-type", "")
        if "protobuf" not in ctype:
            raise UserError(
                f"Content-Type: forward_backward takes application/x-protobuf, got {ctype!r}",
                field="Content-Type",
            )
        mid, seq_id, req = codec.decode_forward_backward(await request.body())
        return future(service.forward_backward(who, mid, seq_id, req), mid)

    @r.post("/optim_step")
    async def optim_step(request: Request) -> dict[str, Any]:
        who, f = owner(request), await fields(request)
        raw = next(
            (f.raw[k] for k in ("adam_params", "optim_params", "optimizer_params") if f.raw.get(k)), {}
        )
        a = Fields(raw)
        d = AdamParams()
        params = AdamParams(
            learning_rate=a.get("learning_rate", float, d.learning_rate),
            beta1=a.get("beta1", float, d.beta1),
            beta2=a.get("beta2", float, d.beta2),
            eps=a.get("eps", float, d.eps),
            weight_decay=a.get("weight_decay", float, d.weight_decay),
            grad_clip_norm=a.get("grad_clip_norm", float, d.grad_clip_norm),
        )
        mid = f.get("model_id", str)
        return future(service.optim_step(who, mid, f.get("seq_id", int), params), mid)

    @r.post("/save_weights")
    async def save_weights(request: Request) -> dict[str, Any]:
        who, f = owner(request), await fields(request)
        mid = f.get("model_id", str)
        rid = service.save_weights(
            who,
            mid,
            f.get("seq_id", int),
            f.get("path", str),
            kind="weights",
            ttl_seconds=f.get("ttl_seconds", int, None),
            overwrite=f.get("overwrite", bool, True),
            user_metadata=f.get("user_metadata", dict, {}),
        )
        return future(rid, mid)

    @r.post("/save_weights_for_sampler")
    async def save_for_sampler(request: Request) -> dict[str, Any]:
        who, f = owner(request), await fields(request)
        mid, seq_id = f.get("model_id", str), f.get("seq_id", int)
        name = f.get("path", str, None)
        if name is None:
            rid = service.save_for_sampler_ephemeral(who, mid, seq_id, f.get("sampling_session_seq_id", int))
        else:
            rid = service.save_weights(
                who,
                mid,
                seq_id,
                name,
                kind="sampler_weights",
                ttl_seconds=f.get("ttl_seconds", int, None),
                overwrite=True,
                user_metadata=f.get("user_metadata", dict, {}),
            )
        return future(rid, mid)

    @r.post("/save_weights_external")
    async def save_external(request: Request) -> dict[str, Any]:
        who, f = owner(request), await fields(request)
        mid = f.get("model_id", str)
        recipients = f.get("age_encryption_recipients", list, None)
        if recipients is not None and not all(isinstance(x, str) for x in recipients):
            raise UserError(
                "age_encryption_recipients: must be a list of strings", field="age_encryption_recipients"
            )
        rid = service.save_weights_external(
            who, mid, f.get("seq_id", int), f.get("path", str), f.get("ttl_seconds", int, None), recipients
        )
        return future(rid, mid)

    @r.post("/load_weights")
    async def load_weights(request: Request) -> dict[str, Any]:
        who, f = owner(request), await fields(request)
        path, optimizer = f.get("path", str), f.get("optimizer", bool, False)
        if "model_id" in f.raw and f.raw["model_id"]:
            mid = f.get("model_id", str)
            return future(service.load_weights_into(who, mid, f.get("seq_id", int), path, optimizer), mid)
        rid, mid = service.load_weights_new(
            who,
            f.get("session_id", str),
            f.get("model_seq_id", int),
            path,
            optimizer,
            f.get("user_metadata", dict, None),
        )
        return future(rid, mid)

    # ---- sampling (protocol §6) -----------------------------------------------------------------------
    @r.post("/create_sampling_session")
    async def create_sampling_session(request: Request) -> dict[str, Any]:
        who, f = owner(request), await fields(request)
        sid = await service.create_sampling_session(
            who,
            f.get("session_id", str),
            f.get("sampling_session_seq_id", int),
            f.get("base_model", str, None),
            f.get("model_path", str, None),
        )
        return {"sampling_session_id": sid, "type": "create_sampling_session"}

    @r.get("/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str, request: Request) -> dict[str, Any]:
        return service.get_sampler(owner(request), sampler_id)

    @r.post("/asample")
    async def asample(request: Request) -> dict[str, Any]:
        who, f = owner(request), await fields(request)
        prompt: list[int] = []
        for i, chunk in enumerate(Fields(f.get("prompt", dict)).get("chunks", list)):
            c = Fields(chunk)
            if c.get("type", str, "encoded_text") != "encoded_text":
                raise UserError(
                    f"prompt.chunks[{i}].type: only encoded_text is supported, got {c.raw.get('type')!r}",
                    field=f"prompt.chunks[{i}].type",
                )
            toks = c.get("tokens", list)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in toks):
                raise UserError(f"prompt.chunks[{i}].tokens: must be a list of integers", field="prompt")
            prompt.extend(toks)
        if f.raw.get("prompt_logprobs_last_n") is not None or f.raw.get("prompt_alt_tokens_k"):
            raise UserError(
                "prompt_logprobs_last_n / prompt_alt_tokens_k: not supported by this server",
                field="prompt_logprobs_last_n",
            )
        if f.raw.get("target_prompt_logprobs") is not None or f.raw.get("topk_sample_logprobs"):
            raise UserError(
                "target_prompt_logprobs / topk_sample_logprobs: not supported by this server",
                field="target_prompt_logprobs",
            )
        try:
            params = codec.sampling_params(f.get("sampling_params", dict, {}))
        except (TypeError, ValueError) as e:
            raise UserError(f"sampling_params: {e}", field="sampling_params") from e
        req = SampleRequest(
            adapter_id=None,
            prompt=prompt,
            params=params,
            num_samples=f.get("num_samples", int, 1),
            prompt_logprobs=f.get("prompt_logprobs", bool, False),
            topk_prompt_logprobs=f.get("topk_prompt_logprobs", int, 0),
        )
        if req.topk_prompt_logprobs:
            req.prompt_logprobs = True
        sid = f.get("sampling_session_id", str)
        rid, seq_ids = await service.sample(who, sid, f.get("seq_id", int, 0), req)
        return future(rid, sample_sequence_ids=seq_ids)

    # ---- futures (protocol §4) ------------------------------------------------------------------------
    @r.post("/retrieve_future")
    async def retrieve_future(request: Request) -> Response:
        who, f = owner(request), await fields(request)
        rid = f.get("request_id", str)
        outcome = await service.retrieve(who, rid)
        if outcome is None:
            # 408 makes the SDK re-poll at once without logging (protocol §4.2).
            return JSONResponse(
                {"detail": "pending", "request_id": rid, "queue_state": "active"}, status_code=408
            )
        if outcome.error is not None:
            return JSONResponse({"error": outcome.error, "category": outcome.category or "unknown"})
        if outcome.proto is not None:
            return Response(outcome.proto, media_type="application/x-protobuf")
        return JSONResponse(outcome.json or {})

    @r.post("/retrieve_futures")
    async def retrieve_futures(request: Request) -> dict[str, Any]:
        who, f = owner(request), await fields(request)
        target = Fields(f.get("target", dict))
        if target.get("type", str, "sampling_session") != "sampling_session":
            raise UserError("target.type: only 'sampling_session' is supported", field="target.type")
        done, cursor = await service.retrieve_futures(
            who,
            target.get("sampling_session_id", str),
            f.get("prev_cursor", int, 0),
            f.get("timeout", float, 30.0),
        )
        return {"completions": [{"state": st, "request_id": rid} for rid, st in done], "cursor": cursor}

    @r.post("/cancel_future")
    async def cancel_future(request: Request) -> dict[str, Any]:
        who, f = owner(request), await fields(request)
        # Protocol §4.3: the SDK ignores the answer; sampling requests stop generating, others complete.
        return {"cancelled": service.cancel(who, f.get("request_id", str))}

    # ---- REST (protocol §10) --------------------------------------------------------------------------
    @r.get("/training_runs")
    async def list_runs(request: Request, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        return service.list_runs(owner(request), limit, offset)

    @r.get("/training_runs/{run_id}")
    async def get_run(run_id: str, request: Request) -> dict[str, Any]:
        return service.get_run(owner(request), run_id)

    @r.get("/training_runs/{run_id}/checkpoints")
    async def run_checkpoints(run_id: str, request: Request) -> dict[str, Any]:
        return service.list_checkpoints(owner(request), run_id)

    @r.get("/checkpoints")
    async def all_checkpoints(request: Request, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        return service.list_checkpoints(owner(request), None, limit, offset)

    def ref(run_id: str, kind: str, name: str) -> CheckpointRef:
        if kind not in KINDS:
            raise UserError(
                f"checkpoint_id: kind must be one of {', '.join(KINDS)}, got {kind!r}", field="checkpoint_id"
            )
        return CheckpointRef(run_id, kind, check_name(name, "checkpoint_id"))

    @r.get("/training_runs/{run_id}/checkpoints/{kind}/{name}")
    async def get_checkpoint(run_id: str, kind: str, name: str, request: Request) -> dict[str, Any]:
        return service.get_checkpoint(owner(request), ref(run_id, kind, name))

    @r.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}")
    async def delete_checkpoint(run_id: str, kind: str, name: str, request: Request) -> dict[str, Any]:
        service.delete_checkpoint(owner(request), ref(run_id, kind, name))
        return {}

    @r.post("/training_runs/{run_id}/checkpoints/{kind}/{name}/publish")
    async def publish(run_id: str, kind: str, name: str, request: Request) -> dict[str, Any]:
        service.set_public(owner(request), ref(run_id, kind, name), True)
        return {}

    @r.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}/publish")
    async def unpublish(run_id: str, kind: str, name: str, request: Request) -> dict[str, Any]:
        service.set_public(owner(request), ref(run_id, kind, name), False)
        return {}

    @r.put("/training_runs/{run_id}/checkpoints/{kind}/{name}/ttl")
    async def set_ttl(run_id: str, kind: str, name: str, request: Request) -> dict[str, Any]:
        who, f = owner(request), await fields(request)
        service.set_ttl(who, ref(run_id, kind, name), f.get("ttl_seconds", int, None))
        return {}

    @r.get("/training_runs/{run_id}/checkpoints/{kind}/{name}/external_weights_urls")
    async def external_urls(run_id: str, kind: str, name: str, request: Request) -> dict[str, Any]:
        urls, expires = service.external_urls(owner(request), ref(run_id, kind, name))
        base = str(request.base_url).rstrip("/") + "/api/v1/"
        import datetime as dt

        return {
            "urls": {k: base + v for k, v in urls.items()},
            "expires": dt.datetime.fromtimestamp(expires, dt.UTC).isoformat(),
        }

    @r.get("/blobs/{token}/{rel:path}")
    async def blob(token: str, rel: str) -> Response:
        # No X-API-Key: the SDK fetches these with plain urllib, so the signed token is the authorization.
        return FileResponse(service.blob_file(token, rel))

    @r.post("/weights_info")
    async def weights_info(request: Request) -> dict[str, Any]:
        who, f = owner(request), await fields(request)
        return service.weights_info(who, f.get("tinker_path", str))

    @r.post("/copy_weights")
    async def copy_weights(request: Request) -> dict[str, Any]:
        who, f = owner(request), await fields(request)
        return {
            "tinker_path": service.copy_weights(
                who, f.get("source_path", str), f.get("ttl_seconds", int, None)
            )
        }

    @r.get("/auth/apikey/me")
    async def whoami(request: Request) -> dict[str, Any]:
        who = owner(request)
        return {"key_id": 0, "name": who, "note": "treadle", "details": {}}

    return r


def too_large(limit: int) -> Response:
    return error_response(413, f"body: requests are limited to {limit} bytes on this server")
