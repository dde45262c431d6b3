"""The image index in MongoDB: pull progress, finished images, lookups; and the embedded server."""

from imagegw.store.embedded import ensure_embedded_server
from imagegw.store.mongo import check_reachable, open_database
from imagegw.store.records import (
    Claim,
    DeadRun,
    ImageFacts,
    ImageStore,
    PullKey,
    Status,
    open_store,
    to_response,
)
from imagegw.store.tracking import PullTracker

__all__ = [
    "Claim",
    "DeadRun",
    "ImageFacts",
    "ImageStore",
    "PullKey",
    "PullTracker",
    "Status",
    "check_reachable",
    "ensure_embedded_server",
    "open_database",
    "open_store",
    "to_response",
]
