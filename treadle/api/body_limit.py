"""Request size limit as plain ASGI middleware: a declared Content-Length over the limit is refused before the
body is read, and a body without one (chunked) is counted as it streams in and refused once it passes the limit.
Both answer 413 with the JSON `{"detail"}` every other error has. A body that stalls (a client that declares
more than it sends, or trickles it) is answered 408 once no part of it arrived for `body_timeout_s`, so it cannot
hold a connection and a handler forever. (Plain ASGI rather than `@app.middleware`,
which runs each request through an extra task and memory streams: a measurable cost on every small request.)"""

from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from treadle.api.errors import error_response


class BodyTooLarge(HTTPException):
    """An HTTPException so that FastAPI's body parsing passes it through as is (it turns others into 400s)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"body: requests are limited to {limit} bytes on this server")


class BodyTimeout(HTTPException):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            408, f"body: no part of the request body arrived for {timeout_s:g} s; send the body it declares"
        )


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int, body_timeout_s: float = 60.0) -> None:
        self.app = app
        self.limit = limit
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await error_response(413, BodyTooLarge(self.limit).detail)(scope, receive, send)
                return
        received = 0
        complete = False

        async def counted() -> Message:
            nonlocal received, complete
            if complete:  # after the body, receive() waits for a disconnect (streaming responses): no timeout
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except TimeoutError:
                raise BodyTimeout(self.body_timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        await self.app(scope, counted, send)
