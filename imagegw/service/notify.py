"""Registry push notifications: a pushed tag that a platform's watch list matches is pulled at once.

Two senders are understood: Distribution (Debian's ``docker-registry``; its
``notifications.endpoints``) and Harbor (its webhook ``PUSH_ARTIFACT`` events). Both send
the shared secret ``NotifySecret`` in the ``Authorization`` header, as ``Bearer <secret>``
or bare, which is how each lets an operator configure a header.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from imagegw.config import Settings
from imagegw.errors import AuthenticationFailed, BadRequest, Forbidden, ImagegwError
from imagegw.service.launch import PullLauncher, start_pull
from imagegw.store import PullKey, open_store
from imagegw.store.watchlist import open_watch_list
from imagegw.watch import parse_watched

_DISTRIBUTION_MANIFESTS = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
_HARBOR_PUSH = {"PUSH_ARTIFACT", "pushImage"}


@dataclass(frozen=True)
class PushedTag:
    """A tag a registry says was pushed; ``hosts`` are the names the registry went by in the event."""

    hosts: frozenset[str]
    repository: str
    tag: str


def check_secret(settings: Settings, authorization: str | None) -> None:
    """Refuse a notification that does not carry the configured shared secret."""
    if settings.notify_secret is None:
        raise Forbidden("registry notifications are off: set NotifySecret in the configuration, and the same "
                        "secret in the registry's notification endpoint")
    offered = (authorization or "").strip()
    offered = offered[len("bearer "):].strip() if offered.lower().startswith("bearer ") else offered
    if not hmac.compare_digest(offered.encode(), settings.notify_secret.encode()):
        raise AuthenticationFailed("the notification's Authorization header does not carry the NotifySecret")


def pushed_tags(body: dict[str, Any]) -> list[PushedTag]:
    """The tags a Distribution or Harbor notification says were pushed (events of other kinds are ignored)."""
    if "events" in body:
        events = body["events"]
        if not isinstance(events, list):
            raise BadRequest("a Distribution notification's 'events' must be a list")
        return list(_distribution_pushes(events))
    if "event_data" in body or "type" in body:
        return list(_harbor_pushes(body))
    raise BadRequest("not a registry notification: expected Distribution's 'events' or Harbor's 'event_data'")


def _distribution_pushes(events: list[Any]) -> Iterator[PushedTag]:
    for event in events:
        if not isinstance(event, dict) or event.get("action") != "push":
            continue
        target, request = event.get("target") or {}, event.get("request") or {}
        if target.get("mediaType") not in _DISTRIBUTION_MANIFESTS or not target.get("tag"):
            continue  # a blob, or a manifest pushed by digest only
        hosts = {urlsplit(str(target.get("url", ""))).netloc, str(request.get("host", ""))} - {""}
        yield PushedTag(frozenset(hosts), str(target.get("repository", "")), str(target["tag"]))


def _harbor_pushes(body: dict[str, Any]) -> Iterator[PushedTag]:
    if body.get("type") not in _HARBOR_PUSH:
        return
    data = body.get("event_data") or {}
    repository = (data.get("repository") or {}).get("repo_full_name", "")
    for resource in data.get("resources") or []:
        if not isinstance(resource, dict) or not resource.get("tag"):
            continue
        host = str(resource.get("resource_url", "")).split("/", 1)[0]
        yield PushedTag(frozenset({host} - {""}), str(repository), str(resource["tag"]))


@dataclass(frozen=True)
class NotifiedPull:
    """A pull a notification asked for, on one platform."""

    system: str
    image: str
    status: str


def pull_pushed(settings: Settings, launch: PullLauncher, pushed: list[PushedTag]) -> list[NotifiedPull]:
    """Start the pull of every pushed tag some platform's watch list matches."""
    watch_list = open_watch_list(settings)
    store = open_store(settings)
    pulls = []
    for system in settings.platforms:
        for key in _watched_keys(settings, system, [entry.image for entry in watch_list.entries(system)], pushed):
            try:
                started = start_pull(store, launch, key, refresh=True,
                                     retry_failures_after=settings.pull_update_timeout)
                status = str(started.record.get("status", ""))
            except ImagegwError as exc:
                status = f"FAILURE: {exc}"
            pulls.append(NotifiedPull(system, key.tag, status))
    return pulls


def _watched_keys(settings: Settings, system: str, entries: list[str], pushed: list[PushedTag]) -> Iterator[PullKey]:
    wanted: dict[str, None] = {}  # ordered, each image once
    for text in entries:
        watched = parse_watched(text, settings)
        for push in pushed:
            if any(watched.matches(host, push.repository, push.tag) for host in push.hosts):
                wanted[watched.image_for(push.tag)] = None
    return (PullKey(system, "docker", image) for image in wanted)
