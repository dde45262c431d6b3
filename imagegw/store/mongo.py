"""The MongoDB the image store lives in, and the one translation of pymongo's failures.

With ``MongoDBURI`` set, the gateway talks to that server; without it, to the embedded
SecantusDB (:mod:`imagegw.store.embedded`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pymongo
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, PyMongoError

from imagegw.config import Settings
from imagegw.errors import IndexUnavailable, RecordConflict
from imagegw.store.embedded import before_stop, ensure_embedded_server

_clients: dict[str, pymongo.MongoClient[dict[str, Any]]] = {}


def open_database(settings: Settings) -> Database[dict[str, Any]]:
    """The gateway's database, starting the embedded server if no URI is configured."""
    uri = settings.mongodb_uri or ensure_embedded_server(settings.state_dir).uri
    client = _clients.get(uri)
    if client is None:
        client = pymongo.MongoClient(uri, serverSelectionTimeoutMS=5000, connectTimeoutMS=5000,
                                     tz_aware=False, appname="imagegw")
        _clients[uri] = client
        before_stop(uri, lambda: _close_client(uri))
    return client[settings.mongodb_database]


def check_reachable(database: Database[dict[str, Any]]) -> None:
    """Raise IndexUnavailable unless the server answers a ping."""
    with mongo_errors():
        database.command("ping")


@contextmanager
def mongo_errors(duplicates_allowed: bool = False) -> Iterator[None]:
    """Translate pymongo's failures into the gateway's vocabulary.

    A duplicate key is a conflict between records, not an outage: retrying cannot help. Callers
    that expect one (a claim racing another) ask for ``DuplicateKeyError`` itself.
    """
    try:
        yield
    except DuplicateKeyError as exc:
        if duplicates_allowed:
            raise
        raise RecordConflict(f"the image index (MongoDB) refused a duplicate record: {exc.details or exc}") from None
    except PyMongoError as exc:
        raise IndexUnavailable(f"the image index (MongoDB) is unavailable: {exc}") from None


def _close_client(uri: str) -> None:
    client = _clients.pop(uri, None)
    if client is not None:
        client.close()
