"""What every Tinker route shares: typed access to the JSON body (`Fields`, which names the offending field in
every error), the caller's identity from `X-API-Key`, and the future reply the SDK polls (protocol §4).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeVar

from fastapi import Request

from treadle.api.decoding import check_number, json_object
from treadle.errors import TreadleError, UserError
from treadle.service.tinker_service import TinkerService

PREFIX = "/api/v1"  # every Tinker route sits under it (protocol §2)

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
        check_number(name, v)
        return v  # type: ignore[return-value]


async def fields(request: Request) -> Fields:
    return Fields(json_object(await request.body()))


def owner(service: TinkerService, request: Request) -> str:
    """The owner the request's API key stands for; raises the service's auth error when it stands for none."""
    return service.auth.owner(request.headers.get("x-api-key"))


def future(request_id: str, model_id: str | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"request_id": request_id, **extra}
    if model_id is not None:
        out["model_id"] = model_id
    return out


@contextlib.contextmanager
def counted(service: TinkerService, who: str, model_id: object, seq_id: object) -> Iterator[None]:
    """Wrap the handling of a sequenced training op: if it is refused (any error answered to the client), its
    seq_id is still counted, so one bad request never wedges the training client (see `skip_seq`)."""
    try:
        yield
    except TreadleError:
        service.requests.skip_seq(who, model_id, seq_id)
        raise
