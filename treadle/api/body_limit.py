"""Request size limit as plain ASGI middleware: a declared Content-Length over the limit is refused before the
body is read, and a body without one (chunked) is counted as it streams in and refused once it passes the limit.
Both answer 413 with the JSON `{"detail"}` every other error has. (Plain ASGI rather than `@app.middleware`,
which runs each request through an extra task and memory streams: a measurable cost on every small request.)"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from treadle.api.errors import error_response


class BodyTooLarge(HTTPException):
    """An HTTPException so that FastAPI's body parsing passes it through as is (it turns others into 400s)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"body: requests are limited to {limit} bytes on this server")


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await error_response(413, BodyTooLarge(self.limit).detail)(scope, receive, send)
                return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)
