"""The image index in MongoDB: pull progress and finished images.

Two collections keep what the runtime reads apart from work in progress:

- ``images``: one record per (system, image id) with Shifter's fields; only
  finished (READY) or EXPIRED images live here, so a lookup never sees a
  half-made image. ``tag`` is a list: a second tag resolving to the same
  digest joins it, and a tag moving to a new digest leaves the old record.
- ``pulls``: one record per (system, type, tag) being pulled, carrying the
  stage (INIT … TRANSFER, READY or FAILURE) and a message a user can act on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import PyMongoError

from imagegw.errors import IndexUnavailable


class Status(str, Enum):
    """Shifter's record states, in pipeline order."""

    INIT = "INIT"
    PENDING = "PENDING"
    PULLING = "PULLING"
    EXAMINATION = "EXAMINATION"
    CONVERSION = "CONVERSION"
    TRANSFER = "TRANSFER"
    READY = "READY"
    FAILURE = "FAILURE"
    EXPIRING = "EXPIRING"
    EXPIRED = "EXPIRED"


@dataclass(frozen=True)
class PullKey:
    """What a pull is filed under: the system, the image type and the user's tag."""

    system: str
    itype: str
    tag: str

    def query(self) -> dict[str, str]:
        return {"system": self.system, "itype": self.itype, "tag": self.tag}


@dataclass(frozen=True)
class ImageFacts:
    """What a finished pull learned about an image, as the index records it."""

    id: str
    manifest_digest: str
    registry: str
    repository: str
    arch: str
    os: str
    size: int
    layers: list[str]
    env: list[str] = field(default_factory=list)
    entry: list[str] | None = None
    cmd: list[str] | None = None
    workdir: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


# Fields of the API's response record, in Shifter's spelling.
RESPONSE_FIELDS = ("id", "system", "itype", "tag", "status", "userACL", "groupACL", "ENV", "ENTRY",
                   "WORKDIR", "LABELS", "last_pull", "status_message")


def to_response(record: dict[str, Any]) -> dict[str, Any]:
    """A record in the shape Shifter's clients read; absent or empty fields are ``"MISSING"``."""
    response = {name: "MISSING" if record.get(name) is None else record[name] for name in RESPONSE_FIELDS}
    if isinstance(response["tag"], str):
        response["tag"] = [response["tag"]]
    return response


class ImageIndex:
    """Reads and writes image and pull records; every call may raise IndexUnavailable."""

    def __init__(self, database: Database, expiration_timeout: int) -> None:
        self._images: Collection = database["images"]
        self._pulls: Collection = database["pulls"]
        self._expiration_timeout = expiration_timeout

    def ensure_indexes(self) -> None:
        """Create the indexes the lookups use (idempotent)."""
        with _index_errors():
            self._images.create_index([("system", ASCENDING), ("id", ASCENDING)], unique=True)
            self._images.create_index([("system", ASCENDING), ("itype", ASCENDING), ("tag", ASCENDING)])
            self._images.create_index([("status", ASCENDING), ("expiration", ASCENDING)])
            self._pulls.create_index(
                [("system", ASCENDING), ("itype", ASCENDING), ("tag", ASCENDING)], unique=True)

    def begin_pull(self, key: PullKey) -> dict[str, Any]:
        """File a pull as INIT, then PENDING: queued for a flow run."""
        now = time.time()
        with _index_errors():
            self._pulls.update_one(
                key.query(),
                {"$set": {"status": Status.INIT.value, "status_message": "Pull requested",
                          "id": "MISSING", "last_pull": now, "heartbeat": now}},
                upsert=True,
            )
        return self.set_stage(key, Status.PENDING, "Waiting for a flow run")

    def set_stage(self, key: PullKey, status: Status, message: str) -> dict[str, Any]:
        """Record the stage a pull has reached (creating the pull record if a flow started it)."""
        with _index_errors():
            record = self._pulls.find_one_and_update(
                key.query(),
                {"$set": {"status": status.value, "status_message": message, "heartbeat": time.time()},
                 "$setOnInsert": {"id": "MISSING", "last_pull": time.time()}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        return record

    def fail_pull(self, key: PullKey, message: str) -> dict[str, Any]:
        """Mark a pull FAILURE with a message the user can act on."""
        return self.set_stage(key, Status.FAILURE, message)

    def publish(self, key: PullKey, facts: ImageFacts) -> dict[str, Any]:
        """Record a finished image as READY under the pull's tag and close the pull."""
        now = time.time()
        fields = {
            "itype": key.itype,
            "status": Status.READY.value,
            "status_message": "Image ready",
            "userACL": [],
            "groupACL": [],
            "private": False,
            "format": "squashfs",
            "ENV": facts.env,
            "ENTRY": facts.entry,
            "CMD": facts.cmd,
            "WORKDIR": facts.workdir,
            "LABELS": facts.labels,
            "last_pull": now,
            "expiration": now + self._expiration_timeout,
            **{name: value for name, value in asdict(facts).items()
               if name not in ("id", "env", "entry", "cmd", "workdir", "labels")},
        }
        with _index_errors():
            # A tag names one image: if it pointed at another digest before, it moves here.
            self._images.update_many(
                {"system": key.system, "itype": key.itype, "tag": key.tag, "id": {"$ne": facts.id}},
                {"$pull": {"tag": key.tag}},
            )
            record = self._images.find_one_and_update(
                {"system": key.system, "id": facts.id},
                {"$set": fields, "$addToSet": {"tag": key.tag}},
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
            self._pulls.update_one(
                key.query(),
                {"$set": {"status": Status.READY.value, "status_message": "Image ready", "id": facts.id,
                          "heartbeat": now}},
                upsert=True,
            )
        return record

    def ready_image(self, system: str, image_id: str) -> dict[str, Any] | None:
        """The READY record of an image id on a system, if any."""
        return self._first(self._images, {"system": system, "id": image_id, "status": Status.READY.value})

    def lookup(self, key: PullKey) -> dict[str, Any] | None:
        """The READY image a tag names on a system, if any."""
        return self._first(self._images, {**key.query(), "status": Status.READY.value})

    def pull_record(self, key: PullKey) -> dict[str, Any] | None:
        """The latest pull record of a tag, if it was ever pulled."""
        return self._first(self._pulls, key.query())

    def list_images(self, system: str) -> list[dict[str, Any]]:
        """All READY images of a system."""
        with _index_errors():
            return list(self._images.find({"system": system, "status": Status.READY.value}).sort("last_pull", -1))

    @staticmethod
    def _first(collection: Collection, query: dict[str, Any]) -> dict[str, Any] | None:
        # find().limit(1) rather than find_one(): SecantusDB answers it ~60x faster.
        with _index_errors():
            return next(iter(collection.find(query).limit(1)), None)


@contextmanager
def _index_errors() -> Iterator[None]:
    """Translate pymongo's failures into the gateway's vocabulary."""
    try:
        yield
    except PyMongoError as exc:
        raise IndexUnavailable(f"the image index (MongoDB) is unavailable: {exc}") from None
