"""Typed errors shared by every layer; the API layer maps each class to one HTTP status in one place."""


class TreadleError(Exception):
    """Base class: `message` is meant for the user and names the field and what is allowed."""

    status_code = 500
    category = "server"

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class UserError(TreadleError):
    """The request is invalid; nothing was changed."""

    status_code = 400
    category = "user"


class NotFoundError(TreadleError):
    status_code = 404
    category = "user"


class AuthError(TreadleError):
    status_code = 401
    category = "user"


class GoneError(TreadleError):
    status_code = 410
    category = "user"


class ConflictError(TreadleError):
    status_code = 409
    category = "user"


class TooLargeError(TreadleError):
    status_code = 413
    category = "user"


def require(cond: bool, field: str, message: str) -> None:
    """Raise a UserError naming `field` unless `cond` holds."""
    if not cond:
        raise UserError(f"{field}: {message}", field=field)
