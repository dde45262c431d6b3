"""Refreshing a platform's images: every tag in use or on the watch list whose registry digest moved
is pulled again.

A tag costs one manifest HEAD when it has not moved. The pull a refresh starts is an ordinary
pull: lookups answer the old image until the new one is READY, and then the tag moves to it.
Tags nobody pulled or looked up within ``ImageExpirationTimeout`` are not refreshed, so they
expire; watched tags are held READY (their expiration pushed out) for as long as they are watched.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from enum import Enum

from imagegw.access import Access
from imagegw.config import Limits, Platform, Settings
from imagegw.errors import ImagegwError
from imagegw.registry import Credential, ImageRef, RegistryClient, image_reference
from imagegw.registry.keychain import Keychain
from imagegw.service.launch import PullLauncher, start_pull
from imagegw.store import ImageStore, PullKey
from imagegw.store.watchlist import WatchList
from imagegw.watch import parse_watched


class Outcome(str, Enum):
    """What the refresh did with one tag."""

    UNCHANGED = "unchanged"
    PULL_STARTED = "pull started"
    PULL_UNDER_WAY = "pull under way"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True)
class TagRefresh:
    """One tag's outcome, and why."""

    image: str
    outcome: Outcome
    detail: str = ""


@dataclass(frozen=True)
class RefreshReport:
    """What one refresh of a platform did, tag by tag."""

    platform: str
    tags: list[TagRefresh]

    def count(self, outcome: Outcome) -> int:
        return sum(1 for tag in self.tags if tag.outcome is outcome)


@dataclass(frozen=True)
class _Candidate:
    image: str
    watched: bool


def refresh_platform(settings: Settings, platform: Platform, store: ImageStore, watch_list: WatchList,
                     launch: PullLauncher) -> RefreshReport:
    """Check every tag in use or watched on ``platform`` against its registry; pull those that moved."""
    with _Registries(settings.limits, settings.registry_timeout) as registries:
        refresher = _Refresher(settings, platform, store, registries, launch)
        expanded = list(refresher.candidates(watch_list))
        results = [item if isinstance(item, TagRefresh) else refresher.refresh(item) for item in expanded]
    return RefreshReport(platform.name, results)


class _Registries(ExitStack):
    """One client per registry location and credential for the whole refresh, so its tokens serve every tag."""

    def __init__(self, limits: Limits, timeout: float) -> None:
        super().__init__()
        self._limits = limits
        self._timeout = timeout
        self._keychain = Keychain()
        self._clients: dict[tuple[str, Credential | None], RegistryClient] = {}

    def client(self, ref: ImageRef) -> RegistryClient:
        credential = self._keychain.credential_for(ref)
        if (ref.location.name, credential) not in self._clients:
            client = self.enter_context(RegistryClient(ref.location, credential=credential, limits=self._limits,
                                                        timeout=self._timeout))
            self._clients[ref.location.name, credential] = client
        return self._clients[ref.location.name, credential]


class _Refresher:
    def __init__(self, settings: Settings, platform: Platform, store: ImageStore, registries: _Registries,
                 launch: PullLauncher) -> None:
        self._settings = settings
        self._platform = platform
        self._store = store
        self._registries = registries
        self._launch = launch

    def candidates(self, watch_list: WatchList) -> Iterator[_Candidate | TagRefresh]:
        """The tags to check, each once: watched ones (patterns expanded), then the ones in use.

        A pattern whose tag list cannot be read yields its failure instead.
        """
        seen: set[str] = set()
        for entry in watch_list.entries(self._platform.name):
            try:
                images = self._expand(entry.image)
            except ImagegwError as exc:
                yield TagRefresh(entry.image, Outcome.FAILED, str(exc))
                continue
            for image in images:
                if image not in seen:
                    seen.add(image)
                    yield _Candidate(image, watched=True)
        since = time.time() - self._settings.expiration_timeout
        for record in self._store.used_since(self._platform.name, since):
            if record.get("itype") != "docker":
                continue  # imported images have no registry to refresh from
            for image in record.get("tag") or []:
                if image not in seen:
                    seen.add(image)
                    yield _Candidate(image, watched=False)

    def refresh(self, candidate: _Candidate) -> TagRefresh:
        """Pull one tag again if its registry digest moved (or it was never pulled)."""
        key = PullKey(self._platform.name, "docker", candidate.image)
        ready = self._store.lookup(key)
        if ready is not None and Access.of(ready).private:
            return TagRefresh(candidate.image, Outcome.SKIPPED, "private image: it is pulled again only when its "
                                                                "user pulls it with their registry login")
        try:
            ref = image_reference(candidate.image, self._settings)
            digest = self._registries.client(ref).tag_digest(ref)
            if ready is not None and digest == self._store.tag_digest(key, ready):
                if candidate.watched:
                    self._store.hold(self._platform.name, ready["id"])
                return TagRefresh(candidate.image, Outcome.UNCHANGED, digest)
            started = start_pull(self._store, self._launch, key, refresh=True,
                                 retry_failures_after=self._settings.pull_update_timeout)
        except ImagegwError as exc:
            return TagRefresh(candidate.image, Outcome.FAILED, str(exc))
        if started.started:
            why = "never pulled" if ready is None else f"moved to {digest}"
            return TagRefresh(candidate.image, Outcome.PULL_STARTED, why)
        return TagRefresh(candidate.image, Outcome.PULL_UNDER_WAY, str(started.record.get("status", "")))

    def _expand(self, text: str) -> list[str]:
        """The images a watch list entry names now: itself, or its pattern's matches in the tag list."""
        watched = parse_watched(text, self._settings)
        if not watched.is_pattern:
            return [watched.image]
        client = self._registries.client(watched.repository)
        return [watched.image_for(tag) for tag in sorted(client.tags(watched.repository.repository))
                if watched.matches_tag(tag)]
