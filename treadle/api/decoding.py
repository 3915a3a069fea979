"""The one place request bodies become Python values: every way a body can be malformed (not UTF-8, not JSON,
NaN/Infinity literals, numbers too long to convert, nesting too deep for the parser) is a `UserError` naming
`body`, never an exception that escapes as a 500."""

from __future__ import annotations

import json
import math
from typing import Any

from treadle.errors import UserError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; send a finite number")


def json_value(body: bytes) -> Any:
    """Parse a JSON body (RFC 8259: UTF-8, finite numbers only); an empty body is `{}`."""
    if not body:
        return {}
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"body: not UTF-8 (byte 0x{body[e.start]:02x} at position {e.start}); JSON bodies must be UTF-8 encoded",
            field="body",
        ) from None
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise UserError(f"body: not valid JSON ({e.msg} at position {e.pos})", field="body") from None
    except RecursionError:
        raise UserError("body: JSON nested too deeply for this server", field="body") from None
    except ValueError as e:  # NaN/Infinity, or an integer literal longer than Python converts (4300 digits)
        raise UserError(f"body: {e}", field="body") from None


def json_object(body: bytes) -> dict[str, Any]:
    value = json_value(body)
    if not isinstance(value, dict):
        raise UserError(f"body: must be a JSON object, got {type(value).__name__}", field="body")
    return value


def check_number(field: str, value: object) -> None:
    """Numbers the store and the engine can hold: integers within int64 (SQL columns, seeds, seq ids), floats
    finite (a NaN learning rate would poison an adapter's weights)."""
    if isinstance(value, bool):
        return
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        raise UserError(
            f"{field}: must be within the 64-bit integer range, got {str(value)[:24]}…", field=field
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{field}: must be a finite number, got {value}", field=field)
