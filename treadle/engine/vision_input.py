"""Expanding image chunks: each `ImageInput` of a datum or prompt is decoded, checked and preprocessed as the model's
own processor does it, and becomes `num_tokens` image placeholder ids in the token list plus an `ImageSpan` the
model fills with vision features. A model without a vision tower refuses images with an error naming the chunk.
"""

from __future__ import annotations

from pathlib import Path

import torch

from treadle.engine.types import Datum, ForwardBackwardRequest, ImageInput, SampleRequest
from treadle.errors import UserError
from treadle.models.config import ModelConfig
from treadle.models.image_processor import ImageProcessorConfig, decode_image, image_key, preprocess
from treadle.models.qwen3_vl import ImageSpan
from treadle.models.vision import VisionConfig


class ImageExpander:
    """Needs the model's config and processor files only, never its weights: the HTTP process of a server whose
    engines run elsewhere expands images itself, so a bad image is refused before any request exists."""

    def __init__(self, config: ModelConfig, model_dir: Path, model_name: str) -> None:
        self.model_name = model_name
        self.family = config.family
        self.vision = VisionConfig.from_dict(config.vision) if config.vision is not None else None
        self.cfg = ImageProcessorConfig.from_dir(model_dir) if self.vision is not None else None

    @property
    def accepts_images(self) -> bool:
        return self.vision is not None

    def expand(self, tokens: list[int], images: list[ImageInput]) -> tuple[list[int], list[ImageSpan]]:
        """Text tokens + images (each before text token `offset`) → the full token list and the image spans."""
        if not images:
            return tokens, []
        if self.vision is None or self.cfg is None:
            raise UserError(
                f"{images[0].field}: model {self.model_name!r} ({self.family}) is a text-only model and takes no "
                "images; serve a vision-language model (family qwen3_vl or qwen3_vl_moe) to send ImageChunks",
                field=images[0].field,
            )
        out: list[int] = []
        spans: list[ImageSpan] = []
        prev = 0
        for im in sorted(images, key=lambda im: im.offset):
            out.extend(tokens[prev : im.offset])
            prev = im.offset
            pixels, grid = preprocess(decode_image(im.data, im.format, im.field), self.cfg)
            span = ImageSpan(
                len(out), grid, torch.from_numpy(pixels), image_key(im.data, self.cfg), self.cfg.merge_size
            )
            if im.expected_tokens is not None and im.expected_tokens != span.num_tokens:
                raise UserError(
                    f"{im.field}.expected_tokens: {im.expected_tokens}, but this {im.format} image is "
                    f"{span.num_tokens} tokens for {self.model_name!r} (grid {grid[1]}×{grid[2]} patches of "
                    f"{self.cfg.patch_size} px, merged {self.cfg.merge_size}×{self.cfg.merge_size})",
                    field=f"{im.field}.expected_tokens",
                )
            out.extend([self.vision.image_token_id] * span.num_tokens)
            spans.append(span)
        out.extend(tokens[prev:])
        return out, spans

    def datum(self, d: Datum) -> None:
        """Expand `d.images` in place (a no-op once expanded)."""
        if not d.images:
            return
        tokens, spans = self.expand([int(t) for t in d.tokens.tolist()], d.images)
        d.tokens = torch.tensor(tokens, dtype=torch.long)
        d.spans = spans
        d.images = []

    def forward_backward(self, req: ForwardBackwardRequest) -> None:
        """Expand every datum's images in place; a UserError names the datum and chunk (`data[i].…`)."""
        for i, d in enumerate(req.data):
            try:
                self.datum(d)
            except UserError as e:
                if e.field and e.field.startswith("data["):
                    raise
                raise UserError(f"data[{i}].{e.message}", field=f"data[{i}].{e.field}") from None

    def sample(self, req: SampleRequest) -> None:
        if not req.images:
            return
        req.prompt, req.spans = self.expand(req.prompt, req.images)
        req.images = []
