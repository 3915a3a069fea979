"""Training (protocol §5): create a LoRA training run, read its info, and queue forward_backward and
optim_step; each queued op answers with a future.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from treadle.api.content_encoding import decode_body
from treadle.api.tinker import codec
from treadle.api.tinker.routes.wire import Fields, counted, fields, future, owner
from treadle.engine.types import AdamParams, LoraConfig
from treadle.errors import UserError
from treadle.service.tinker_service import TinkerService


def add_routes(r: APIRouter, service: TinkerService) -> None:
    @r.post("/create_model")
    async def create_model(request: Request) -> dict[str, Any]:
        who, f = owner(service, request), await fields(request)
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
        rid, mid = service.training.create_model(
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
        who, f = owner(service, request), await fields(request)
        return codec.model_info(service.training.get_info(who, f.get("model_id", str)))

    @r.post("/forward_backward")
    async def forward_backward(request: Request) -> dict[str, Any]:
        who = owner(service, request)
        ctype = request.headers.get("content-type", "")
        if "protobuf" not in ctype:
            raise UserError(
                f"Content-Type: forward_backward takes application/x-protobuf, got {ctype!r}",
                field="Content-Type",
            )
        body = decode_body(
            await request.body(), request.headers.get("content-encoding"), request.app.state.max_request_bytes
        )
        msg = codec.parse_forward_backward(body)
        with counted(service, who, msg.model_id, int(msg.seq_id)):
            mid, seq_id, req = codec.forward_backward_from_message(msg)
            custom = codec.custom_loss_config(msg) if req.loss_fn == "custom" else None
            return future(service.training.forward_backward(who, mid, seq_id, req, custom), mid)

    @r.post("/optim_step")
    async def optim_step(request: Request) -> dict[str, Any]:
        who, f = owner(service, request), await fields(request)
        with counted(service, who, f.raw.get("model_id"), f.raw.get("seq_id")):
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
            return future(service.training.optim_step(who, mid, f.get("seq_id", int), params), mid)
