"""Sampling (protocol §6): open a sampling session, read a sampler, and queue `asample`, whose prompt chunks
and sampling params are checked here so that unsupported options fail with a named field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request

from treadle.api.tinker import codec
from treadle.api.tinker.images import dmel_refused, image_from_json
from treadle.api.tinker.routes.wire import Fields, fields, future, owner
from treadle.engine.losses import STABLE_REINFORCE_REFUSAL
from treadle.engine.types import ImageInput, SampleRequest, SamplingParams
from treadle.errors import UserError
from treadle.service.tinker_service import TinkerService


def add_routes(r: APIRouter, service: TinkerService) -> None:
    @r.post("/create_sampling_session")
    async def create_sampling_session(request: Request) -> dict[str, Any]:
        who, f = owner(service, request), await fields(request)
        sid = await service.sampling.create_sampling_session(
            who,
            f.get("session_id", str),
            f.get("sampling_session_seq_id", int),
            f.get("base_model", str, None),
            f.get("model_path", str, None),
        )
        return {"sampling_session_id": sid, "type": "create_sampling_session"}

    @r.get("/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str, request: Request) -> dict[str, Any]:
        return service.sampling.get_sampler(owner(service, request), sampler_id)

    @r.post("/asample")
    async def asample(request: Request) -> dict[str, Any]:
        who, f = owner(service, request), await fields(request)
        prompt, images = _prompt(f, service.cfg.image_dir)
        req = SampleRequest(
            adapter_id=None,
            prompt=prompt,
            images=images,
            params=_sampling_params(f),
            num_samples=f.get("num_samples", int, 1),
            prompt_logprobs=f.get("prompt_logprobs", bool, False),
            topk_prompt_logprobs=f.get("topk_prompt_logprobs", int, 0),
            topk_sample_logprobs=f.get("topk_sample_logprobs", int, 0),
            prompt_logprobs_last_n=f.get("prompt_logprobs_last_n", int, None),
            prompt_alt_tokens_k=f.get("prompt_alt_tokens_k", int, 0),
            target_prompt_logprobs=codec.target_ids(f.raw.get("target_prompt_logprobs")),
            target_prompt_sparse=codec.is_sparse(f.raw.get("target_prompt_logprobs")),
        )
        if req.topk_prompt_logprobs:
            req.prompt_logprobs = True
        sid = f.get("sampling_session_id", str)
        rid, seq_ids = await service.sampling.sample(who, sid, f.get("seq_id", int, 0), req)
        return future(rid, sample_sequence_ids=seq_ids)


def _prompt(f: Fields, image_dir: Path | None) -> tuple[list[int], list[ImageInput]]:
    """The prompt's text token ids and its image chunks (each placed before text token `offset`)."""
    prompt: list[int] = []
    images: list[ImageInput] = []
    for i, chunk in enumerate(Fields(f.get("prompt", dict)).get("chunks", list)):
        c = Fields(chunk)
        kind = c.get("type", str, "encoded_text")
        if kind in ("image", "image_asset_pointer"):
            images.append(image_from_json(c.raw, len(prompt), f"prompt.chunks[{i}]", image_dir))
            continue
        if kind == "dmel":
            raise dmel_refused(f"prompt.chunks[{i}]")
        if kind != "encoded_text":
            raise UserError(
                f"prompt.chunks[{i}].type: must be encoded_text, image or image_asset_pointer, got {kind!r}",
                field=f"prompt.chunks[{i}].type",
            )
        toks = c.get("tokens", list)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in toks):
            raise UserError(f"prompt.chunks[{i}].tokens: must be a list of integers", field="prompt")
        prompt.extend(toks)
    return prompt, images


def _sampling_params(f: Fields) -> SamplingParams:
    """`sampling_params`, after refusing `record_stability_info` (see `losses.STABLE_REINFORCE_REFUSAL`)."""
    if f.raw.get("record_stability_info"):
        raise UserError(f"record_stability_info: {STABLE_REINFORCE_REFUSAL}", field="record_stability_info")
    try:
        return codec.sampling_params(f.get("sampling_params", dict, {}))
    except (TypeError, ValueError) as e:
        raise UserError(f"sampling_params: {e}", field="sampling_params") from e
