"""Image and audio chunks on the wire (protobuf `forward_backward`, JSON `asample`) → `ImageInput`s.

The server fetches nothing from the network. `ImageAssetPointerChunk.location` may name a file under the directory
given by `treadle serve --image-dir` (a relative path, or an absolute path / `file://` URL inside it); anything
else — URLs of any other scheme, paths outside the directory (also through `..` or symlinks), or any path when
no directory is configured — is refused with a 400 naming the chunk.

`dmel` (audio) chunks are refused: treadle serves no audio model family, so no served model could read them.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from tinker.proto import tinker_public_pb2 as pb

from treadle.engine.types import ImageInput
from treadle.errors import UserError
from treadle.models.image_processor import MAX_IMAGE_BYTES


def dmel_refused(field: str) -> UserError:
    return UserError(
        f"{field}: dmel (audio) chunks need an audio model; treadle serves no audio model family (vision-language "
        "models take ImageChunks), so no model here can read them",
        field=field,
    )


def image_from_proto(chunk: pb.ImageChunk, offset: int, field: str) -> ImageInput:
    if chunk.HasField("override_dimensions"):
        raise UserError(
            f"{field}.override_dimensions: not supported; the image is resized as the model's own processor "
            "does it (send the image at the size you want instead)",
            field=f"{field}.override_dimensions",
        )
    expected = int(chunk.expected_tokens) if chunk.HasField("expected_tokens") else None
    return ImageInput(offset, bytes(chunk.data), chunk.format, expected, field)


def _expected(raw: dict[str, Any], field: str) -> int | None:
    v = raw.get("expected_tokens")
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise UserError(
            f"{field}.expected_tokens: must be a positive integer", field=f"{field}.expected_tokens"
        )
    return v


def image_from_json(raw: dict[str, Any], offset: int, field: str, image_dir: Path | None) -> ImageInput:
    """An `image` (base64 `data`) or `image_asset_pointer` (`location`) chunk of an asample prompt."""
    fmt = raw.get("format")
    if not isinstance(fmt, str):
        raise UserError(f"{field}.format: required ('png' or 'jpeg')", field=f"{field}.format")
    if raw.get("type") == "image":
        data = raw.get("data")
        if not isinstance(data, str):
            raise UserError(f"{field}.data: must be a base64 string", field=f"{field}.data")
        try:
            blob = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise UserError(f"{field}.data: not valid base64 ({e})", field=f"{field}.data") from None
        return ImageInput(offset, blob, fmt, _expected(raw, field), field)
    location = raw.get("location")
    if not isinstance(location, str) or not location:
        raise UserError(
            f"{field}.location: required (a path under the server's --image-dir)", field=f"{field}.location"
        )
    return ImageInput(offset, read_local_image(location, image_dir, field), fmt, _expected(raw, field), field)


def read_local_image(location: str, image_dir: Path | None, field: str) -> bytes:
    """The bytes of `location` if it is a file inside `image_dir`; never a network fetch."""
    f = f"{field}.location"
    parsed = urlparse(location)
    if parsed.scheme not in ("", "file") or (
        parsed.scheme == "file" and parsed.netloc not in ("", "localhost")
    ):
        raise UserError(
            f"{f}: {parsed.scheme}:// locations are refused; the server fetches nothing from the network. Send the "
            "image bytes in an ImageChunk, or a path under the server's --image-dir",
            field=f,
        )
    if image_dir is None:
        raise UserError(
            f"{f}: this server reads no local image files (start `treadle serve --image-dir DIR` to allow paths "
            "under DIR); send the image bytes in an ImageChunk",
            field=f,
        )
    root = image_dir.resolve()
    raw_path = Path(unquote(parsed.path) if parsed.scheme == "file" else location)
    path = (raw_path if raw_path.is_absolute() else root / raw_path).resolve()
    if not path.is_relative_to(root):
        raise UserError(f"{f}: {location!r} is outside the server's --image-dir {str(root)!r}", field=f)
    if not path.is_file():
        raise UserError(f"{f}: no file {location!r} under the server's --image-dir", field=f)
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise UserError(f"{f}: {location!r} is larger than {MAX_IMAGE_BYTES} bytes", field=f)
    return path.read_bytes()
