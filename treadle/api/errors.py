"""One place that maps errors to HTTP: every error is JSON `{"detail": ...}`, never an empty body
(protocol §1.6: the SDK treats an empty 400 as a dropped connection and retries it 16 times)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from treadle.errors import TreadleError

log = logging.getLogger(__name__)


def error_response(status: int, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def http_detail(req: Request, exc: HTTPException) -> str:
    """The router's own refusals name what is wrong: the path (404) or the method (405), not just "Not Found"."""
    if exc.status_code == 404 and exc.detail == "Not Found":
        return (
            f"path: no route {req.method} {req.url.path[:200]!r} on this server; identifiers in paths are "
            "single segments (checkpoints are <kind>/<name> with kind one of weights, sampler_weights, "
            "external_weights); see the API reference"
        )
    if exc.status_code == 405:
        return f"method: {req.method} is not allowed on {req.url.path[:200]!r}"
    return str(exc.detail) or "error"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TreadleError)
    async def _treadle(_req: Request, exc: TreadleError) -> JSONResponse:
        retry_after = getattr(
            exc, "retry_after_s", None
        )  # a limit (429): the SDK waits this long, then retries
        headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else None
        return error_response(exc.status_code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}"
            for e in exc.errors()
        ]
        return error_response(400, "; ".join(parts) or "invalid request")

    @app.exception_handler(HTTPException)
    async def _http(req: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, http_detail(req, exc), exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def _gone(_req: Request, _exc: ClientDisconnect) -> JSONResponse:
        # The client closed before sending its whole body: nobody reads this answer, and it is not a server fault.
        return error_response(400, "body: the client disconnected before sending all of it")

    @app.exception_handler(Exception)
    async def _internal(_req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal server error: {type(exc).__name__}: {exc}")
