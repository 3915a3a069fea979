"""The Tinker routes under `/api/v1` (protocol §2–§11): decode the request, call the service, encode.

One module per concern: `sessions`, `training`, `weights`, `sampling`, `futures`, `checkpoints` (REST);
`wire` holds what they share, `router` puts them together.
"""

from treadle.api.tinker.routes.router import make_router
from treadle.api.tinker.routes.wire import Fields, fields, future

__all__ = ["Fields", "fields", "future", "make_router"]
