"""The one place a compressed request body is decoded: `Content-Encoding: zstd` (the SDK compresses
forward_backward's protobuf when the client config says `proto_compress_fwdbwd`). The decoded size is bounded by
the same limit as a plain body, so a small compressed body cannot expand without bound."""

from __future__ import annotations

import zstandard

from treadle.errors import TooLargeError, UserError

ENCODINGS = ("identity", "zstd")


def decode_body(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """`body` as sent → the bytes it encodes; a UserError naming Content-Encoding for what cannot be decoded."""
    encoding = (content_encoding or "identity").strip().lower() or "identity"
    if encoding == "identity":
        return body
    if encoding != "zstd":
        raise UserError(
            f"Content-Encoding: {encoding!r} is not supported; allowed: {', '.join(ENCODINGS)}",
            field="Content-Encoding",
        )
    parts: list[bytes] = []
    total = 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(body, read_across_frames=True)
        while chunk := reader.read(min(1 << 22, limit + 1 - total)):
            parts.append(chunk)
            total += len(chunk)
            if total > limit:
                raise TooLargeError(
                    f"body: decompressed requests are limited to {limit} bytes on this server", field="body"
                )
    except zstandard.ZstdError as e:
        raise UserError(
            f"Content-Encoding: the body is not valid zstd ({e})", field="Content-Encoding"
        ) from e
    return b"".join(parts)
