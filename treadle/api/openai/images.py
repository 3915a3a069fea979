"""OpenAI chat `image_url` content parts: data URLs only (the server fetches nothing, so remote URLs are refused with
a 400 naming the part). The chat template renders one image placeholder per image (Qwen3-VL's
`<|vision_start|><|image_pad|><|vision_end|>`); each placeholder is then expanded by the engine into the image's
tokens, exactly as for a Tinker `ImageChunk`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from typing import TYPE_CHECKING, Any

from treadle.api.openai.schemas import Message
from treadle.engine.types import ImageInput
from treadle.errors import UserError
from treadle.models.qwen3_vl import ImageSpan

if TYPE_CHECKING:
    from treadle.api.openai.backend import ServedModel

_MIME_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg"}


@dataclasses.dataclass(frozen=True)
class ChatImage:
    field: str  # "messages[1].content[0]"
    data: bytes
    format: str


def _data_url(url: Any, field: str) -> tuple[bytes, str]:
    f = f"{field}.image_url.url"
    if not isinstance(url, str) or not url:
        raise UserError(f"{f}: required (a data:image/png;base64,… URL)", field=f)
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if ":" in url else "a path"
        raise UserError(
            f"{f}: only data: URLs are accepted, got {scheme}; the server fetches nothing from the network — "
            "send the image inline as data:image/png;base64,… or data:image/jpeg;base64,…",
            field=f,
        )
    head, _, payload = url[5:].partition(",")
    mime, _, enc = head.partition(";")
    fmt = _MIME_FORMATS.get(mime.lower())
    if fmt is None:
        raise UserError(
            f"{f}: image type {mime or '(none)'!r} is not supported; use image/png or image/jpeg", field=f
        )
    if enc.lower() != "base64":
        raise UserError(f"{f}: the data URL must be base64-encoded (data:{mime};base64,…)", field=f)
    try:
        return base64.b64decode(payload, validate=True), fmt
    except (binascii.Error, ValueError) as e:
        raise UserError(f"{f}: not valid base64 ({e})", field=f) from None


def chat_images(messages: list[Message]) -> list[ChatImage]:
    """Every `image_url` part of the conversation, in order, decoded from its data URL."""
    out: list[ChatImage] = []
    for i, msg in enumerate(messages):
        if isinstance(msg.content, str) or msg.content is None:
            continue
        for j, part in enumerate(msg.content):
            if part.type != "image_url":
                continue
            field = f"messages[{i}].content[{j}]"
            raw = (part.model_extra or {}).get("image_url")
            spec = raw if isinstance(raw, dict) else {"url": raw}
            detail = spec.get("detail", "auto")
            if detail not in (None, "auto"):
                raise UserError(
                    f"{field}.image_url.detail: only 'auto' is supported (the image is processed as the model's own "
                    f"processor does it), got {detail!r}",
                    field=f"{field}.image_url.detail",
                )
            data, fmt = _data_url(spec.get("url"), field)
            out.append(ChatImage(field, data, fmt))
    return out


def refuse_unless_vision(engine: ServedModel, images: list[ChatImage]) -> None:
    """A text-only model refuses image parts (before its chat template sees them), naming the first one."""
    if images and not engine.images.accepts_images:
        im = images[0]
        engine.images.expand([], [ImageInput(0, im.data, im.format, None, im.field)])


def expand_chat_images(
    engine: ServedModel, prompt: list[int], images: list[ChatImage]
) -> tuple[list[int], list[ImageSpan]]:
    """Prompt ids with one image placeholder per image → ids with each image's tokens, and the image spans."""
    if not images:
        return prompt, []
    refuse_unless_vision(engine, images)
    vision = engine.images.vision
    assert vision is not None
    where = [k for k, t in enumerate(prompt) if t == vision.image_token_id]
    if len(where) != len(images):
        raise UserError(
            f"messages: the chat template rendered {len(where)} image placeholders for {len(images)} images",
            field="messages",
        )
    text = [t for t in prompt if t != vision.image_token_id]
    inputs = [
        ImageInput(k - n, im.data, im.format, None, im.field)
        for n, (k, im) in enumerate(zip(where, images, strict=True))
    ]
    return engine.images.expand(text, inputs)
