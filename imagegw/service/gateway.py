"""What the REST API does, as plain calls: list, look up, pull, import, expire.

Each call takes the authenticated :class:`Caller` and raises the gateway's
errors (the API maps them to HTTP codes). Flow runs are started through a
``PullLauncher`` the API supplies, so this module knows nothing of Prefect.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagegw.config import Platform, Settings
from imagegw.store.mongo import open_index
from imagegw.errors import BadRequest, Forbidden, ImageNotFound, ServiceUnavailable
from imagegw.service.identity import Caller
from imagegw.publish.importer import copy_importable
from imagegw.store.records import PUBLIC, Access, ImageFacts, ImageIndex, PullKey, Status, to_response
from imagegw.plan import plan_pull, pull_key
from imagegw.publish.shifter_meta import render_meta
from imagegw.publish.local import publish_local, unpublish_local
from imagegw.registry.reference import normalize_tag

PullLauncher = Callable[[PullKey], str]
"""Starts the flow run of a claimed pull and returns the run's id."""

LOOKUP_TYPES = ("docker", "custom")
MAX_METRICS = 1000


@dataclass(frozen=True)
class AclRequest:
    """The uids and gids a pull or import asks to share a private image with."""

    uids: tuple[int, ...] = ()
    gids: tuple[int, ...] = ()

    def access_for(self, caller: Caller) -> Access:
        """A private access for these ids plus the requester (Shifter appends the requester too)."""
        return Access(True, tuple(sorted({*self.uids, caller.uid})), tuple(sorted({*self.gids, caller.gid})))


def parse_acl(body: dict[str, Any]) -> AclRequest:
    """``{"allowed_uids": "1000,1", "allowed_gids": "4"}`` (strings as shifterimg sends, or lists)."""
    return AclRequest(_ids(body.get("allowed_uids"), "allowed_uids"), _ids(body.get("allowed_gids"), "allowed_gids"))


class Gateway:
    """The gateway's operations on one configuration."""

    def __init__(self, settings: Settings, launcher: PullLauncher) -> None:
        self.settings = settings
        self._launch = launcher

    def index(self) -> ImageIndex:
        return open_index(self.settings)

    def list_images(self, caller: Caller, system: str) -> list[dict[str, Any]]:
        """READY images of a system the caller may read."""
        platform = self.settings.platform(system)
        return [to_response(record) for record in self.index().list_images(system)
                if caller.may_read(Access.of(record), platform)]

    def lookup(self, caller: Caller, system: str, itype: str, tag: str) -> dict[str, Any]:
        """The READY image a tag names; looking it up keeps it from expiring."""
        platform = self.settings.platform(system)
        key = self._lookup_key(system, itype, tag)
        index = self.index()
        record = index.lookup(key)
        # A private image the caller may not read is "not found": its existence must not leak.
        if record is None or not caller.may_read(Access.of(record), platform):
            raise ImageNotFound(f"no READY image {key.tag} ({itype}) on {system}")
        index.renew(system, record["id"])
        if self.settings.metrics:
            index.record_lookup(system, itype, key.tag, record["id"], caller.uid, caller.user)
        return to_response(record)

    def pull(self, caller: Caller, system: str, itype: str, tag: str, acl: AclRequest) -> dict[str, Any]:
        """Start a pull, or return the image or the pull already running; never two runs for one tag."""
        platform = self.settings.platform(system)
        job = plan_pull(self.settings, pull_key(system, tag, itype))
        login = caller.login_for(job.ref.location)
        access = acl.access_for(caller) if login else PUBLIC
        index = self.index()
        ready = index.lookup(job.key)
        if ready is not None and self._still_fresh(ready, access) and caller.may_read(Access.of(ready), platform):
            return to_response(ready)
        record, claimed = index.claim_pull(job.key, access, self.settings.pull_update_timeout)
        if not claimed:
            return to_response(record)
        if login is not None:
            index.store_login(job.key, login)
        try:
            run_id = self._launch(job.key)
        except Exception as exc:
            message = f"cannot start a flow run for {job.key.tag} on {system}: {exc}"
            index.fail_pull(job.key, message)
            raise ServiceUnavailable(message) from None
        return to_response(index.mark_queued(job.key, run_id))

    def import_image(self, caller: Caller, system: str, itype: str, tag: str, body: dict[str, Any]) -> dict[str, Any]:
        """Publish a squashfs file the caller has on the gateway host (users listed in ImportUsers only)."""
        platform = self.settings.platform(system)
        if not self.settings.may_import(caller.user):
            raise Forbidden(f"user {caller.user or caller.uid} may not import images (ImportUsers)")
        filepath, image_format = body.get("filepath"), body.get("format", "squashfs")
        if not isinstance(filepath, str) or not filepath:
            raise BadRequest("doimport needs a 'filepath' in the JSON body")
        if image_format != "squashfs":
            raise BadRequest(f"format {image_format!r} cannot be imported (only 'squashfs')")
        acl = parse_acl(body)
        access = acl.access_for(caller) if acl.uids or acl.gids else PUBLIC
        key = self._lookup_key(system, itype, tag)
        self.settings.expand_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="import-", dir=self.settings.expand_dir) as scratch:
            copied = copy_importable(filepath, caller.uid, caller.groups, Path(scratch))
            meta = render_meta(env=[], entry=None, cmd=None, workdir=None,
                               user_acl=access.user_acl, group_acl=access.group_acl)
            published = publish_local(copied.path, meta, platform.image_dir, copied.image_id)
        facts = ImageFacts(id=copied.image_id, manifest_digest=f"sha256:{copied.image_id}", registry="import",
                           repository=filepath, arch="unknown", os="unknown", size=published.size, layers=[])
        return to_response(self.index().publish(key, facts, access))

    def expire(self, caller: Caller, system: str, itype: str, tag: str) -> None:
        """Remove an image's files and mark it EXPIRED (admins only)."""
        platform = self._admin_platform(caller, system, "expire")
        key = self._lookup_key(system, itype, tag)
        record = self.index().lookup(key)
        if record is None:
            raise ImageNotFound(f"no READY image {key.tag} ({itype}) on {system}")
        self._expire(platform, record["id"])

    def autoexpire(self, caller: Caller, system: str) -> list[str]:
        """Expire every image past its expiration and forget old failed pulls (admins only)."""
        platform = self._admin_platform(caller, system, "autoexpire")
        index = self.index()
        now = time.time()
        expired = [record["id"] for record in index.due_for_expiry(system, now)]
        for image_id in expired:
            self._expire(platform, image_id)
        index.clear_failures(system, now - self.settings.pull_update_timeout)
        return expired

    def queue(self, caller: Caller, system: str) -> list[dict[str, str]]:
        """Pulls of a system not yet READY (queued, running or failed) that the caller may see."""
        platform = self.settings.platform(system)
        return [{"status": record["status"], "image": record["tag"]}
                for record in self.index().pulls_in_progress(system)
                if caller.may_read(Access.of(record), platform)]

    def metrics(self, caller: Caller, system: str, limit: int) -> list[dict[str, Any]]:
        """The latest lookups of a system (admins only)."""
        self._admin_platform(caller, system, "metrics")
        if not 1 <= limit <= MAX_METRICS:
            raise BadRequest(f"limit must be from 1 to {MAX_METRICS}, not {limit}")
        return self.index().recent_lookups(system, limit)

    def _expire(self, platform: Platform, image_id: str) -> None:
        index = self.index()
        index.set_image_status(platform.name, image_id, Status.EXPIRING, "Removing image files")
        unpublish_local(platform.image_dir, image_id)
        index.set_image_status(platform.name, image_id, Status.EXPIRED, "Expired")

    def _admin_platform(self, caller: Caller, system: str, action: str) -> Platform:
        platform = self.settings.platform(system)
        if not caller.is_admin(platform):
            raise Forbidden(f"{action} is for the admins of {system}; {caller.user or caller.uid} is not one")
        return platform

    def _still_fresh(self, ready: dict[str, Any], access: Access) -> bool:
        """A READY image pulled within PullUpdateTimeout, whose access already covers this request."""
        if time.time() - ready.get("last_pull", 0) >= self.settings.pull_update_timeout:
            return False
        held = Access.of(ready)
        if not access.private:
            return not held.private
        return held.private and set(access.user_acl) <= set(held.user_acl) \
            and set(access.group_acl) <= set(held.group_acl)

    @staticmethod
    def _lookup_key(system: str, itype: str, tag: str) -> PullKey:
        if itype not in LOOKUP_TYPES:
            raise BadRequest(f"image type {itype!r} is not one of {', '.join(LOOKUP_TYPES)}")
        return PullKey(system, itype, normalize_tag(tag))


def _ids(value: Any, name: str) -> tuple[int, ...]:
    if value is None or value == "":
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise BadRequest(f"{name} must be a comma-separated string of numbers, not {value!r}")
    try:
        ids = tuple(int(str(item).strip()) for item in items if str(item).strip())
    except ValueError:
        raise BadRequest(f"{name} must hold numeric ids, not {value!r}") from None
    if any(number < 0 for number in ids):
        raise BadRequest(f"{name} must hold non-negative ids, not {value!r}")
    return ids
