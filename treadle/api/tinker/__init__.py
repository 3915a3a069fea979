"""The Tinker protocol over HTTP (JSON + protobuf, futures long-poll, REST runs/checkpoints)."""

from treadle.api.tinker.routes import make_router

__all__ = ["make_router"]
