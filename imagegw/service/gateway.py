"""What the REST API does, as plain calls: list, look up, pull, import, expire.

Each call takes the authenticated :class:`Caller` and raises the gateway's
errors (the API maps them to HTTP codes). Flow runs are started through a
``PullLauncher`` the API supplies (see :mod:`imagegw.service.launch`).
"""

from __future__ import annotations

import time
from typing import Any

from imagegw.access import PUBLIC, Access, AclRequest, parse_acl
from imagegw.config import Platform, Settings
from imagegw.disk import scratch_directory
from imagegw.errors import BadRequest, Forbidden, ImageNotFound
from imagegw.expiry import expire_due, expire_image
from imagegw.plan import plan_pull, pull_key
from imagegw.publish import copy_importable, publisher_for, render_meta
from imagegw.registry import Credential, normalize_tag, parse_image_reference
from imagegw.registry.keychain import REQUEST, HandedCredential
from imagegw.service.identity import Caller
from imagegw.service.launch import PullLauncher, start_pull
from imagegw.store import ImageFacts, ImageStore, PullKey, Status, open_store, to_response

LOOKUP_TYPES = ("docker", "custom")
MAX_METRICS = 1000


class Gateway:
    """The gateway's operations on one configuration."""

    def __init__(self, settings: Settings, launcher: PullLauncher) -> None:
        self.settings = settings
        self._launch = launcher

    def store(self) -> ImageStore:
        return open_store(self.settings)

    def list_images(self, caller: Caller, system: str) -> list[dict[str, Any]]:
        """READY images of a system the caller may read."""
        platform = self.settings.platform(system)
        return [to_response(record) for record in self.store().list_images(system)
                if caller.may_read(Access.of(record), platform)]

    def lookup(self, caller: Caller, system: str, itype: str, tag: str) -> dict[str, Any]:
        """The READY image a tag names; looking it up keeps it from expiring."""
        platform = self.settings.platform(system)
        key = self._lookup_key(system, itype, tag)
        store = self.store()
        record = store.lookup(key)
        # A private image the caller may not read is "not found": its existence must not leak.
        if record is None or not caller.may_read(Access.of(record), platform):
            raise ImageNotFound(f"no READY image {key.tag} ({itype}) on {system}")
        store.renew_if_due(record)
        if self.settings.metrics:
            store.record_lookup(system, itype, key.tag, record["id"], caller.uid, caller.user)
        return to_response(record)

    def pull(self, caller: Caller, system: str, itype: str, tag: str, acl: AclRequest) -> dict[str, Any]:
        """Start a pull, or return the image or the pull already running; never two runs for one tag."""
        platform = self.settings.platform(system)
        job = plan_pull(self.settings, pull_key(system, tag, itype))
        login = caller.login_for(job.ref.location, self.settings.default_location)
        handed = None if login is None else HandedCredential(
            Credential(source="the pull request's login (authorized_locations)", username=login.username,
                       password=login.password), REQUEST)
        access = acl.access_for(caller.uid, caller.gid) if login else PUBLIC
        store = self.store()
        looked_up_at = time.time()
        ready = store.lookup(job.key)
        if ready is not None and self._answers(ready, access, caller, platform):
            return to_response(ready)
        started = start_pull(store, self._launch, job.key, access=access, login=handed,
                             retry_failures_after=self.settings.pull_update_timeout, looked_up_at=looked_up_at)
        if not started.started and started.record.get("status") == Status.READY.value:
            # The tag's running pull went READY after the lookup: its image may be the answer.
            ready = store.lookup(job.key)
            if ready is not None and self._answers(ready, access, caller, platform):
                return to_response(ready)
        return to_response(started.record)

    def _answers(self, ready: dict[str, Any], access: Access, caller: Caller, platform: Platform) -> bool:
        """Whether the READY image ``ready`` answers a pull asking for ``access``: fresh, and the caller's to read."""
        return self._still_fresh(ready, access) and caller.may_read(Access.of(ready), platform)

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
        if platform.remote is not None:
            # The file would be on the cluster, where the gateway could read it only as its own SSH
            # account, not as the user: it cannot tell what the user may read there.
            raise BadRequest(f"{system} publishes over SSH to {platform.image_location}: doimport takes files on "
                             "the gateway host only, so it is not available for this platform")
        acl = parse_acl(body)
        access = acl.access_for(caller.uid, caller.gid) if acl.uids or acl.gids else PUBLIC
        key = self._lookup_key(system, itype, tag)
        with scratch_directory(self.settings.expand_dir, "import-") as scratch, publisher_for(platform) as publisher:
            copied = copy_importable(filepath, caller.uid, caller.gid, caller.groups, scratch)
            meta = render_meta(env=[], entry=None, cmd=None, workdir=None,
                               user_acl=access.user_acl, group_acl=access.group_acl)
            published = publisher.publish(copied.path, meta, copied.image_id)
        facts = ImageFacts(id=copied.image_id, manifest_digest=f"sha256:{copied.image_id}", registry="import",
                           repository=filepath, arch="unknown", os="unknown", size=published.size, layers=[])
        return to_response(self.store().publish(key, facts, access))

    def expire(self, caller: Caller, system: str, itype: str, tag: str) -> None:
        """Remove an image's files and mark it EXPIRED (admins only)."""
        platform = self._admin_platform(caller, system, "expire")
        key = self._lookup_key(system, itype, tag)
        record = self.store().lookup(key)
        if record is None:
            raise ImageNotFound(f"no READY image {key.tag} ({itype}) on {system}")
        with publisher_for(platform) as publisher:
            expire_image(self.store(), platform, publisher, record)

    def autoexpire(self, caller: Caller, system: str) -> list[str]:
        """Expire every image past its expiration and forget old failed pulls (admins only)."""
        platform = self._admin_platform(caller, system, "autoexpire")
        report = expire_due(self.store(), platform, self.settings.pull_update_timeout)
        return [image.id for image in report.expired]

    def queue(self, caller: Caller, system: str) -> list[dict[str, str]]:
        """Pulls of a system not yet READY (queued, running or failed) that the caller may see."""
        platform = self.settings.platform(system)
        return [{"status": record["status"], "image": record["tag"]}
                for record in self.store().pulls_in_progress(system)
                if caller.may_read(Access.of(record), platform)]

    def metrics(self, caller: Caller, system: str, limit: int) -> list[dict[str, Any]]:
        """The latest lookups of a system (admins only)."""
        self._admin_platform(caller, system, "metrics")
        if not 1 <= limit <= MAX_METRICS:
            raise BadRequest(f"limit must be from 1 to {MAX_METRICS}, not {limit}")
        return self.store().recent_lookups(system, limit)

    def _admin_platform(self, caller: Caller, system: str, action: str) -> Platform:
        platform = self.settings.platform(system)
        if not caller.is_admin(platform):
            raise Forbidden(f"{action} is for the admins of {system}; {caller.user or caller.uid} is not one")
        return platform

    def _still_fresh(self, ready: dict[str, Any], access: Access) -> bool:
        """A READY image pulled within PullUpdateTimeout, whose access already covers this request."""
        pulled_lately = time.time() - ready.get("last_pull", 0) < self.settings.pull_update_timeout
        return pulled_lately and Access.of(ready).covers(access)

    def _lookup_key(self, system: str, itype: str, tag: str) -> PullKey:
        if itype not in LOOKUP_TYPES:
            raise BadRequest(f"image type {itype!r} is not one of {', '.join(LOOKUP_TYPES)}")
        # A name no pull or import could have filed (NUL, '..', over-long) gets pull's 400 saying what is wrong
        # with it, not a 404 that makes it look merely absent.
        parse_image_reference(tag, self.settings.locations, self.settings.default_location)
        return PullKey(system, itype, normalize_tag(tag))
