"""The watch list in MongoDB: per platform, the images (or tag patterns) operators want held READY."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pymongo import ASCENDING
from pymongo.collection import Collection
from pymongo.database import Database

from imagegw.config import Settings
from imagegw.store.mongo import mongo_errors, open_database


@dataclass(frozen=True)
class WatchEntry:
    """One entry of a platform's watch list."""

    system: str
    image: str
    """An image name whose tag may be a pattern (see :mod:`imagegw.watch`)."""
    added_by: str
    added: float


class WatchList:
    """Reads and changes the watch lists of all platforms; every call may raise IndexUnavailable."""

    def __init__(self, database: Database[dict[str, Any]]) -> None:
        self._entries: Collection[dict[str, Any]] = database["watch"]
        with mongo_errors():
            self._entries.create_index([("system", ASCENDING), ("image", ASCENDING)], unique=True)

    def add(self, system: str, image: str, added_by: str) -> bool:
        """Add an entry; False if the platform already watches ``image``."""
        with mongo_errors():
            result = self._entries.update_one(
                {"system": system, "image": image},
                {"$setOnInsert": {"added_by": added_by, "added": time.time()}}, upsert=True)
        return result.upserted_id is not None

    def remove(self, system: str, image: str) -> bool:
        """Remove an entry; False if the platform did not watch ``image``."""
        with mongo_errors():
            return self._entries.delete_one({"system": system, "image": image}).deleted_count == 1

    def entries(self, system: str) -> list[WatchEntry]:
        """The platform's entries, oldest first."""
        with mongo_errors():
            documents = list(self._entries.find({"system": system}).sort("added", ASCENDING))
        return [WatchEntry(system, document["image"], document.get("added_by", ""), document.get("added", 0.0))
                for document in documents]


def open_watch_list(settings: Settings) -> WatchList:
    return WatchList(open_database(settings))
