"""Persistence: the metadata DB (SQLite default, any SQLAlchemy URL) and checkpoint blobs on disk."""

from treadle.store.blobs import KINDS, BlobStore, check_name
from treadle.store.db import (
    CheckpointRow,
    FutureRow,
    MetadataStore,
    RunRow,
    SamplerRow,
    SessionRow,
    as_utc,
    utcnow,
)

__all__ = [
    "KINDS",
    "BlobStore",
    "CheckpointRow",
    "FutureRow",
    "MetadataStore",
    "RunRow",
    "SamplerRow",
    "SessionRow",
    "as_utc",
    "check_name",
    "utcnow",
]
