"""The image index in MongoDB: pull progress and finished images.

Two collections keep what the runtime reads apart from work in progress:

- ``images``: one record per (system, image id) with Shifter's fields; only
  finished (READY) or EXPIRED images live here, so a lookup never sees a
  half-made image. ``tag`` is a list: a second tag resolving to the same
  digest joins it, and a tag moving to a new digest leaves the old record.
- ``pulls``: one record per (system, type, tag) being pulled, carrying the
  stage (INIT … TRANSFER, READY or FAILURE) and a message a user can act on.
  Once READY it keeps the digest the tag named (``tag_digest``), which the
  refresh flow compares with the registry's.

An image's ``last_used`` is when a user last pulled or looked it up. A refresh's
pull is no use: the image it publishes keeps the ``last_used`` and ``expiration``
of the one it replaces, so an image nobody uses still expires.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.collection import Collection
from pymongo.cursor import Cursor
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from imagegw.access import PUBLIC, Access, settle_access
from imagegw.config import BEATS_PER_STALE_PULL_TIMEOUT, DEFAULT_STALE_PULL_TIMEOUT, Settings
from imagegw.errors import IndexUnavailable, PullTakenOver
from imagegw.registry import Credential, ResolvedImage
from imagegw.registry.keychain import HandedCredential
from imagegw.store.mongo import mongo_errors, open_database
from imagegw.store.sealing import Sealer, sealer_for


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
    """What a finished pull learned about an image, as the store records it."""

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
    tag_digest: str | None = None
    """What the pulled tag named (see ResolvedImage.tag_digest); kept in the tag's pull record."""

    @classmethod
    def of_image(cls, image: ResolvedImage, size: int) -> ImageFacts:
        """What the store records of a pulled image whose squashfs has ``size`` bytes."""
        config = image.runtime_config
        return cls(
            id=image.image_id,
            manifest_digest=image.manifest_digest,
            registry=image.ref.location.host,
            repository=image.ref.repository,
            arch=image.config.get("architecture", "unknown"),
            os=image.config.get("os", "unknown"),
            size=size,
            layers=[layer.digest for layer in image.layers],
            env=list(config.get("Env") or []),
            entry=config.get("Entrypoint") or None,
            cmd=config.get("Cmd") or None,
            workdir=config.get("WorkingDir") or None,
            labels=dict(config.get("Labels") or {}),
            tag_digest=image.tag_digest,
        )


@dataclass(frozen=True)
class DeadRun:
    """The flow run of a running pull whose record went silent past ``StalePullTimeout``: a request took
    its pull over."""

    flow_run_id: str
    silent_for: float
    """Seconds the record had gone without the run's heartbeat."""


@dataclass(frozen=True)
class Claim:
    """What a request to pull a tag found: the pull record, and whether this request claimed it (filed a new
    pull, under a new ``pull_id``, which only the run it starts may write under)."""

    record: dict[str, Any]
    claimed: bool
    taken_over: DeadRun | None = None
    """The run whose pull this claim took over, still RUNNING for all Prefect knows."""


# Fields of the API's response record, in Shifter's spelling.
RESPONSE_FIELDS = ("id", "system", "itype", "tag", "status", "userACL", "groupACL", "ENV", "ENTRY",
                   "WORKDIR", "LABELS", "last_pull", "status_message")


def to_response(record: dict[str, Any]) -> dict[str, Any]:
    """A record in the shape Shifter's clients read; absent or empty fields are ``"MISSING"``."""
    response = {name: "MISSING" if record.get(name) is None else record[name] for name in RESPONSE_FIELDS}
    if isinstance(response["tag"], str):
        response["tag"] = [response["tag"]]
    return response


ACTIVE_STATES = (Status.INIT, Status.PENDING, Status.PULLING, Status.EXAMINATION, Status.CONVERSION,
                 Status.TRANSFER)
QUEUED_STATES = (Status.INIT, Status.PENDING)
RUNNING_STATES = tuple(state for state in ACTIVE_STATES if state not in QUEUED_STATES)
# A running pull's record silent for StalePullTimeout belongs to a run that died (see the store's
# heartbeat_interval); a queued pull waits for a worker, which may take long.
STALE_QUEUED = 3600
# Seconds within which a looked-up image is not renewed again (lookups come at every job start).
RENEW_INTERVAL = 60
# Tags whose record a store remembers, for lookups by ``_id`` (a site has thousands; past this, it starts over).
MAX_FOUND_TAGS = 100_000
_EXPIRY_INDEX = "status_1_expiration_1"
# Registry logins wait here for the flow run that needs them, and no longer than this.
LOGIN_LIFETIME = 3600


class ImageStore:
    """Reads and writes image and pull records; every call may raise IndexUnavailable."""

    def __init__(self, database: Database[dict[str, Any]], expiration_timeout: int,
                 sealer: Sealer | None = None, stale_pull_timeout: int = DEFAULT_STALE_PULL_TIMEOUT) -> None:
        """``sealer``: seals the registry logins handed to pulls (a store without one cannot take them);
        ``stale_pull_timeout``: seconds without a heartbeat after which a running pull counts as dead."""
        self._images: Collection[dict[str, Any]] = database["images"]
        self._pulls: Collection[dict[str, Any]] = database["pulls"]
        self._logins: Collection[dict[str, Any]] = database["pull_logins"]
        self._metrics: Collection[dict[str, Any]] = database["metrics"]
        self._expiration_timeout = expiration_timeout
        self._sealer = sealer
        self._stale_pull_timeout = stale_pull_timeout
        self._found: dict[PullKey, Any] = {}

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between a running pull's heartbeats: several fit in the stale timeout, so a few beats a busy
        host or database delays do not make a live pull look dead."""
        return self._stale_pull_timeout / BEATS_PER_STALE_PULL_TIMEOUT

    def ensure_indexes(self) -> None:
        """Create the indexes the lookups use (idempotent)."""
        with mongo_errors():
            self._images.create_index([("system", ASCENDING), ("id", ASCENDING)], unique=True)
            self._images.create_index([("system", ASCENDING), ("itype", ASCENDING), ("tag", ASCENDING)])
            # SecantusDB weighs every index of a collection for every query: this one, which only the hourly
            # expiry query could use, cost a quarter of a lookup's database time (bench/README.md). Earlier
            # versions made it.
            if _EXPIRY_INDEX in self._images.index_information():
                self._images.drop_index(_EXPIRY_INDEX)
            self._pulls.create_index(
                [("system", ASCENDING), ("itype", ASCENDING), ("tag", ASCENDING)], unique=True)
            self._logins.create_index(
                [("system", ASCENDING), ("itype", ASCENDING), ("tag", ASCENDING)], unique=True)
            self._logins.create_index("created", expireAfterSeconds=LOGIN_LIFETIME)
            self._metrics.create_index([("system", ASCENDING), ("time", ASCENDING)])

    # -- pulls ------------------------------------------------------------------------------------

    def claim_pull(self, key: PullKey, access: Access = PUBLIC, retry_failures_after: float = 0,
                   refresh: bool = False) -> tuple[dict[str, Any], bool]:
        """``claim``'s record and whether this call claimed it, for a caller that runs the pull itself
        (``imagegw pull``) and has no Prefect deployment's run to end."""
        claim = self.claim(key, access, retry_failures_after, refresh)
        return claim.record, claim.claimed

    def claim(self, key: PullKey, access: Access = PUBLIC, retry_failures_after: float = 0,
              refresh: bool = False, looked_up_at: float | None = None) -> Claim:
        """File a new pull as INIT, under a new ``pull_id``, unless one is already running.

        Any number of concurrent callers: exactly one claims. A pull whose run died (its record
        silent past the stale limits) can be claimed again, and the claim names the dead run; a
        FAILURE only after ``retry_failures_after`` seconds, so that clients polling a failed pull
        see the failure. ``refresh``: the refresh flow asks, not a user (see the module's note on
        ``last_used``). ``looked_up_at``: when the caller looked the tag's image up and found none it
        could answer with; a pull that went READY since is not claimed (its READY is the answer).
        """
        now = time.time()
        running = [state.value for state in RUNNING_STATES]
        claimable = {**key.query(), "$or": [
            *_ended_pulls(looked_up_at),
            {"status": Status.FAILURE.value, "heartbeat": {"$lt": now - retry_failures_after}},
            {"status": {"$in": [state.value for state in QUEUED_STATES]}, "heartbeat": {"$lt": now - STALE_QUEUED}},
            {"status": {"$in": running}, "heartbeat": {"$lt": now - self._stale_pull_timeout}},
        ]}
        claimed = {"status": Status.INIT.value, "status_message": "Pull requested", "id": "MISSING",
                   "last_pull": now, "heartbeat": now, "pull_id": uuid.uuid4().hex, "refresh": refresh,
                   **access.fields()}
        try:
            with mongo_errors(duplicates_allowed=True):
                # The record as it was: whose run this claim takes over is in it, and nowhere after.
                before = self._pulls.find_one_and_update(claimable, {"$set": claimed, "$unset": {"flow_run_id": ""}},
                                                         upsert=True, return_document=ReturnDocument.BEFORE)
        except DuplicateKeyError:
            # The record exists and is not claimable: somebody's pull is running.
            record = self.pull_record(key) or {**key.query(), "status": Status.PENDING.value}
            return Claim(self._silence_noted(record, now), claimed=False)
        if before is None:  # a tag never pulled
            return Claim({**key.query(), **claimed}, claimed=True)
        kept = {name: value for name, value in before.items() if name != "flow_run_id"}
        return Claim({**kept, **claimed}, claimed=True, taken_over=_dead_run(before, now))

    def _silence_noted(self, record: dict[str, Any], now: float) -> dict[str, Any]:
        """A running pull whose heartbeats stopped says so, and when a request will start it again: its
        stage alone would tell a poller it is still at work until it is taken over."""
        silent = now - float(record.get("heartbeat", now))
        if record.get("status") not in [state.value for state in RUNNING_STATES] \
                or silent < 2 * self.heartbeat_interval:
            return record
        left = max(0.0, self._stale_pull_timeout - silent)
        return {**record, "status_message": f"{record.get('status_message', '')} (no heartbeat from its run for "
                                            f"{silent:.0f} s: it may have died; a request after {left:.0f} s more "
                                            "without one starts the pull again)"}

    def mark_queued(self, key: PullKey, pull_id: str, flow_run_id: str) -> dict[str, Any]:
        """A flow run was created for the claim ``pull_id``: PENDING until a worker starts it."""
        claim = {**key.query(), "pull_id": pull_id}
        with mongo_errors():
            # Whatever stage the run reached already (a worker may start it before this): a request that
            # takes the pull over must know which run to end.
            self._pulls.update_one(claim, {"$set": {"flow_run_id": flow_run_id}})
            return self._pulls.find_one_and_update(
                {**claim, "status": Status.INIT.value},
                {"$set": {"status": Status.PENDING.value, "status_message": "Waiting for a worker",
                          "heartbeat": time.time()}},
                return_document=ReturnDocument.AFTER,
            ) or self.pull_record(key) or {}

    def claim_for_run(self, key: PullKey) -> str:
        """The ``pull_id`` a run started without one writes under: ``imagegw pull``'s own run, which claimed
        the pull itself, or an operator's from the Prefect UI. The record's, or a new one when the tag has no
        record or one without a claim (an import's)."""
        now = time.time()
        try:
            with mongo_errors(duplicates_allowed=True):
                record = self._pulls.find_one_and_update(
                    {**key.query(), "pull_id": {"$exists": False}},
                    {"$set": {"pull_id": uuid.uuid4().hex},
                     "$setOnInsert": {"status": Status.INIT.value, "status_message": "Pull requested",
                                      "id": "MISSING", "last_pull": now, "heartbeat": now}},
                    upsert=True, return_document=ReturnDocument.AFTER)
        except DuplicateKeyError:  # the record has a claim: the run joins it
            record = self.pull_record(key)
        return str(_upserted(record)["pull_id"])

    def set_stage(self, key: PullKey, pull_id: str, status: Status, message: str) -> dict[str, Any]:
        """Record the stage a pull has reached, as the run of the claim ``pull_id``; raises PullTakenOver
        when another run's claim replaced it."""
        with mongo_errors():
            record = self._pulls.find_one_and_update(
                {**key.query(), "pull_id": pull_id},
                {"$set": {"status": status.value, "status_message": message, "heartbeat": time.time()}},
                return_document=ReturnDocument.AFTER,
            )
        if record is None:
            raise self._taken_over(key)
        return record

    def beat(self, key: PullKey, pull_id: str) -> None:
        """Show that the run of the claim ``pull_id`` is alive; raises PullTakenOver when it was replaced."""
        with mongo_errors():
            beaten = self._pulls.update_one({**key.query(), "pull_id": pull_id}, {"$set": {"heartbeat": time.time()}})
        if beaten.matched_count == 0:
            raise self._taken_over(key)

    def fail_pull(self, key: PullKey, pull_id: str, message: str) -> dict[str, Any]:
        """Mark the claim ``pull_id``'s pull FAILURE with a message the user can act on (see ``set_stage``)."""
        return self.set_stage(key, pull_id, Status.FAILURE, message)

    def _taken_over(self, key: PullKey) -> PullTakenOver:
        return PullTakenOver(
            f"the pull of {key.tag} for {key.system} was taken over by another run after its record went "
            f"{self._stale_pull_timeout} s (StalePullTimeout) or more without a heartbeat from this one: this run "
            "stops, publishing nothing and leaving the record to the new run (if this host or its database was "
            "that slow while the run was alive, raise StalePullTimeout)")

    def requested_access(self, key: PullKey) -> Access:
        """The access the pull's requester asked for (public when the pull was not requested privately)."""
        record = self.pull_record(key)
        return Access.of(record) if record else PUBLIC

    def pull_record(self, key: PullKey) -> dict[str, Any] | None:
        """The latest pull record of a tag, if it was ever pulled."""
        return self._first(self._pulls, key.query())

    def silence_of_dead_pull(self, key: PullKey, pull_id: str) -> float | None:
        """Seconds the running pull ``pull_id`` of ``key`` has gone without its run's heartbeat, if that is past
        StalePullTimeout (its run died: the rule by which a request takes a pull over); None while it lives, or
        once it ended or was taken over."""
        record = self.pull_record(key)
        if record is None or record.get("pull_id") != pull_id or record.get("heartbeat") is None \
                or record.get("status") not in [state.value for state in RUNNING_STATES]:
            return None  # without a heartbeat, as for ``claim``: no silence to judge by
        silent = time.time() - float(record["heartbeat"])
        return silent if silent > self._stale_pull_timeout else None

    def pulls_in_progress(self, system: str) -> list[dict[str, Any]]:
        """Pulls of a system that are queued, running or failed."""
        with mongo_errors():
            return list(self._pulls.find({"system": system, "status": {"$nin": [Status.READY.value,
                                                                                  Status.EXPIRED.value]}}))

    def clear_failures(self, system: str, older_than: float) -> int:
        """Forget FAILURE pulls whose last attempt is older than ``older_than`` (epoch)."""
        with mongo_errors():
            return self._pulls.delete_many({"system": system, "status": Status.FAILURE.value,
                                            "heartbeat": {"$lt": older_than}}).deleted_count

    # -- registry logins for private pulls -------------------------------------------------------

    def store_login(self, key: PullKey, handed: HandedCredential) -> None:
        """Keep a pull's registry credential, sealed, until its run takes it (at most LOGIN_LIFETIME s)."""
        credential = handed.credential
        sealed = self._sealer_or_fail().seal({
            "given_by": handed.given_by, "source": credential.source, "username": credential.username,
            "password": credential.password, "identity_token": credential.identity_token,
            "registry_token": credential.registry_token})
        with mongo_errors():
            self._logins.replace_one(key.query(), {**key.query(), "sealed": sealed, "created": datetime.now(UTC)},
                                     upsert=True)

    def take_login(self, key: PullKey) -> HandedCredential | None:
        """The pull's handed credential, removed from the database as it is read."""
        with mongo_errors():
            document = self._logins.find_one_and_delete(key.query())
        if document is None:
            return None
        opened = self._sealer_or_fail().open(document.get("sealed", b""), f"the registry login for {key.tag}")
        given_by = str(opened.pop("given_by"))
        return HandedCredential(Credential(**opened), given_by)

    def _sealer_or_fail(self) -> Sealer:
        if self._sealer is None:
            raise IndexUnavailable("this image store was opened without the login sealing key")
        return self._sealer

    # -- images -----------------------------------------------------------------------------------

    def settle_access(self, system: str, image_id: str, requested: Access) -> Access:
        """Who may read an image once this pull publishes it (see :func:`imagegw.access.settle_access`)."""
        published = self.ready_image(system, image_id)
        return settle_access(Access.of(published) if published else None, requested)

    def publish(self, key: PullKey, facts: ImageFacts, access: Access = PUBLIC,
                pull_id: str | None = None) -> dict[str, Any]:
        """Record a finished image as READY under the pull's tag and close the pull: the run of the claim
        ``pull_id`` (raises PullTakenOver, writing nothing, when it was replaced), or an import (None)."""
        if pull_id is not None:
            # Refused before any image record is touched; once beaten, the claim cannot be taken over for
            # StalePullTimeout, far longer than the writes below take.
            self.beat(key, pull_id)
        now = time.time()
        pull = self.pull_record(key) or {}
        replaced = self.lookup(key) if pull.get("refresh") else None
        fields = {
            "itype": key.itype,
            "status": Status.READY.value,
            "status_message": "Image ready",
            **access.fields(),
            "format": "squashfs",
            "ENV": facts.env,
            "ENTRY": facts.entry,
            "CMD": facts.cmd,
            "WORKDIR": facts.workdir,
            "LABELS": facts.labels,
            "last_pull": now,
            "last_used": _last_used(replaced) if replaced else now,
            "expiration": replaced["expiration"] if replaced else now + self._expiration_timeout,
            **{name: value for name, value in asdict(facts).items()
               if name not in ("id", "env", "entry", "cmd", "workdir", "labels", "tag_digest")},
        }
        with mongo_errors():
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
                key.query() if pull_id is None else {**key.query(), "pull_id": pull_id},
                {"$set": {"status": Status.READY.value, "status_message": "Image ready", "id": facts.id,
                          "heartbeat": now, "tag_digest": facts.tag_digest or facts.manifest_digest}},
                upsert=pull_id is None,
            )
        return _upserted(record)

    def ready_image(self, system: str, image_id: str) -> dict[str, Any] | None:
        """The READY record of an image id on a system, if any."""
        return self._ready(self._images.find({"system": system, "id": image_id}).limit(1))

    def lookup(self, key: PullKey) -> dict[str, Any] | None:
        """The READY image a tag names on a system, if any.

        The record is read by its ``_id`` when this store found the tag before: SecantusDB answers that
        in two thirds of the database time the tag's index takes, and a lookup comes at every job
        start. What is read is the record as it is now, and it counts only if it still carries the
        tag; a tag moved, expired or never seen is read through its index.
        """
        known = self._found.get(key)
        if known is not None:
            record = self._ready(self._images.find({"_id": known}).limit(1))
            if record is not None and _names(record, key):
                return record
        record = self._ready(self._images.find(key.query()))
        if record is not None:
            if len(self._found) >= MAX_FOUND_TAGS:
                self._found.clear()
            self._found[key] = record["_id"]
        return record

    @staticmethod
    def _ready(records: Cursor[dict[str, Any]]) -> dict[str, Any] | None:
        """The READY one of a query's records. The status is checked here, not in the query: given it,
        SecantusDB scans every READY image through the (status, expiration) index instead of using
        the tag's or the id's (13 ms, not 1.1, among 200 images; more with more). A tag or an id
        names one record per system, whatever its status."""
        with mongo_errors():
            return next((record for record in records if record.get("status") == Status.READY.value), None)

    def renew(self, system: str, image_id: str) -> None:
        """Push an image's expiration out again: somebody still uses it."""
        now = time.time()
        with mongo_errors():
            self._images.update_one({"system": system, "id": image_id},
                                    {"$set": {"expiration": now + self._expiration_timeout, "last_used": now}})

    def renew_if_due(self, record: dict[str, Any]) -> None:
        """Renew a looked-up image unless that was done within RENEW_INTERVAL: a lookup then costs one
        database round trip, not two, and the expiration lags by at most that much."""
        if time.time() - record.get("last_used", 0) >= RENEW_INTERVAL:
            self.renew(record["system"], record["id"])

    def hold(self, system: str, image_id: str) -> None:
        """Push an image's expiration out without counting a use: the platform's watch list holds it."""
        with mongo_errors():
            self._images.update_one({"system": system, "id": image_id},
                                    {"$set": {"expiration": time.time() + self._expiration_timeout}})

    def used_since(self, system: str, since: float) -> list[dict[str, Any]]:
        """READY images of a system that a user pulled or looked up after ``since`` (epoch)."""
        return [record for record in self.list_images(system) if _last_used(record) >= since]

    def tag_digest(self, key: PullKey, image: dict[str, Any]) -> str:
        """The digest ``key``'s tag named when ``image``, its READY record, was pulled."""
        pull = self.pull_record(key) or {}
        return str(pull.get("tag_digest") or image["manifest_digest"])

    def list_images(self, system: str) -> list[dict[str, Any]]:
        """All READY images of a system."""
        with mongo_errors():
            return list(self._images.find({"system": system, "status": Status.READY.value}).sort("last_pull", -1))

    def due_for_expiry(self, system: str, now: float) -> list[dict[str, Any]]:
        """READY images of a system whose expiration has passed."""
        with mongo_errors():
            return list(self._images.find({"system": system, "status": Status.READY.value,
                                           "expiration": {"$lt": now}}))

    def set_image_status(self, system: str, image_id: str, status: Status, message: str) -> None:
        """Move a finished image to EXPIRING or EXPIRED (lookups then no longer find it)."""
        with mongo_errors():
            self._images.update_one({"system": system, "id": image_id},
                                    {"$set": {"status": status.value, "status_message": message}})

    # -- metrics ----------------------------------------------------------------------------------

    def record_lookup(self, system: str, itype: str, tag: str, image_id: str, uid: int, user: str | None) -> None:
        """One metrics row per lookup, as Shifter's ``/api/metrics`` reports them."""
        with mongo_errors():
            self._metrics.insert_one({"user": user, "uid": uid, "system": system, "type": itype, "tag": tag,
                                      "id": image_id, "time": time.time()})

    def recent_lookups(self, system: str, limit: int) -> list[dict[str, Any]]:
        """The latest ``limit`` metrics rows of a system, newest first."""
        with mongo_errors():
            rows = self._metrics.find({"system": system}, {"_id": False}).sort("time", -1).limit(limit)
            return list(rows)

    @staticmethod
    def _first(collection: Collection[dict[str, Any]], query: dict[str, Any]) -> dict[str, Any] | None:
        # find().limit(1) rather than find_one(): SecantusDB answers it far faster (bench/README.md).
        with mongo_errors():
            return next(iter(collection.find(query).limit(1)), None)


def _last_used(image: dict[str, Any]) -> float:
    """When a user last pulled or looked the image up (records older than ``last_used`` have ``last_pull``)."""
    return float(image.get("last_used", image.get("last_pull", 0)))


def _dead_run(before: dict[str, Any], now: float) -> DeadRun | None:
    """The run a claim took over, from the record it replaced: one that was running, with a flow run to end
    (``imagegw pull``'s own runs have none). Queued and finished pulls have no live run to end."""
    if before.get("status") not in [state.value for state in RUNNING_STATES] or not before.get("flow_run_id"):
        return None
    return DeadRun(str(before["flow_run_id"]), now - float(before.get("heartbeat", now)))


def _names(record: dict[str, Any], key: PullKey) -> bool:
    """Whether an image record is the one ``key``'s tag names (a tag is on one record per system and type)."""
    tags = record.get("tag")
    return (record.get("system") == key.system and record.get("itype") == key.itype
            and (key.tag == tags if isinstance(tags, str) else key.tag in (tags or ())))


def _ended_pulls(looked_up_at: float | None) -> list[dict[str, Any]]:
    """The query for a tag's pull that ended other than in FAILURE, READY only if it was READY by ``looked_up_at``.

    A lookup that found no image, then the publish of the tag's running pull (the image, then the pull's record
    READY), then the claim: without that bound the claim found a READY pull and started the pull again.
    """
    unfinished_or_failed = [state.value for state in ACTIVE_STATES] + [Status.FAILURE.value]
    if looked_up_at is None:
        return [{"status": {"$nin": unfinished_or_failed}}]
    return [{"status": {"$nin": [*unfinished_or_failed, Status.READY.value]}},
            {"status": Status.READY.value, "heartbeat": {"$lt": looked_up_at}},
            {"status": Status.READY.value, "heartbeat": {"$exists": False}}]


def _upserted(record: dict[str, Any] | None) -> dict[str, Any]:
    """The document an upsert returned: with ``ReturnDocument.AFTER`` there always is one."""
    if record is None:
        raise IndexUnavailable("the image index (MongoDB) returned no document for an upsert")
    return record


# The stores this process opened, by client, database and configuration: the API opens one for every
# request, and making one (its collections, its sealer) cost a tenth of a lookup's time in the API.
_stores: dict[tuple[int, str, int, Path, int], ImageStore] = {}


def open_store(settings: Settings) -> ImageStore:
    """The image store, its MongoDB indexes created on first use in this process."""
    database = open_database(settings)
    key = (id(database.client), database.name, settings.expiration_timeout, settings.seal_key_path,
           settings.stale_pull_timeout)
    store = _stores.get(key)
    if store is None:
        store = ImageStore(database, settings.expiration_timeout, sealer_for(settings.seal_key_path),
                           settings.stale_pull_timeout)
        store.ensure_indexes()
        _stores[key] = store
    return store
