"""The refresh: tags in use or watched are checked against their registry and pulled again when they moved.

The pulls it starts run the real pull flow, in this process, against the session's registry.
"""

from __future__ import annotations

import time
import uuid

import pymongo
import pytest

from imagegw.access import Access
from imagegw.refresh import Outcome, RefreshReport, refresh_platform
from imagegw.store import PullKey, open_store
from imagegw.store.watchlist import WatchList
from tests.gateway_fixtures import Gateway, pull
from testsupport.images import LayerBuilder, push_image


class Pulls:
    """A launcher that runs each pull's flow at once (``run``) or only notes it, as a busy worker would."""

    def __init__(self, gateway: Gateway, run: bool = True) -> None:
        self.gateway = gateway
        self.run = run
        self.launched: list[str] = []

    def __call__(self, key: PullKey, pull_id: str) -> str:
        self.launched.append(key.tag)
        if self.run:
            state, record = pull(self.gateway, key.tag)  # the flow run joins the claim
            assert state.is_completed(), record["status_message"]
        return str(uuid.uuid4())

    def end_dead_run(self, flow_run_id: str, reason: str) -> None:
        raise AssertionError(f"no pull was expected to be taken over ({flow_run_id}: {reason})")


def refresh(gateway: Gateway, launch: Pulls) -> RefreshReport:
    settings = gateway.settings
    return refresh_platform(settings, settings.platform("mycluster"), open_store(settings), watch_list(gateway), launch)


def watch_list(gateway: Gateway) -> WatchList:
    return WatchList(pymongo.MongoClient(gateway.mongo_uri)[gateway.database])


def outcomes(report: RefreshReport) -> dict[str, Outcome]:
    return {tag.image: tag.outcome for tag in report.tags}


def push(gateway: Gateway, repository_and_tag: str, content: bytes) -> str:
    repository, tag = repository_and_tag.rsplit(":", 1)
    return push_image(gateway.registry, repository, tag, [LayerBuilder().file("content", content)]).manifest_digest


def lookup(gateway: Gateway, image: str) -> dict | None:
    return gateway.store().lookup(PullKey("mycluster", "docker", image))


def unique(name: str) -> str:
    return f"refresh/{name}-{uuid.uuid4().hex[:8]}"


def test_a_moved_tag_is_pulled_again_and_lookups_answer_the_old_image_until_then(gateway: Gateway) -> None:
    image = gateway.image(unique("app") + ":latest")
    old = push(gateway, image.split("/", 1)[1], b"old")
    state, _ = pull(gateway, image)
    assert state.is_completed()
    new = push(gateway, image.split("/", 1)[1], b"new")

    queued = Pulls(gateway, run=False)
    assert outcomes(refresh(gateway, queued)) == {image: Outcome.PULL_STARTED}
    assert lookup(gateway, image)["manifest_digest"] == old, "the old image is served while the new one is pulled"
    assert outcomes(refresh(gateway, queued)) == {image: Outcome.PULL_UNDER_WAY}, "never two pulls of a tag"

    state, _ = pull(gateway, image)  # the worker runs the queued pull
    assert state.is_completed()
    assert lookup(gateway, image)["manifest_digest"] == new
    assert (gateway.image_dir / f"{new.split(':')[1]}.squashfs").is_file()


def test_an_unchanged_tag_starts_no_pull(gateway: Gateway) -> None:
    image = gateway.image(unique("same") + ":1")
    digest = push(gateway, image.split("/", 1)[1], b"same")
    pull(gateway, image)
    launch = Pulls(gateway)
    report = refresh(gateway, launch)
    assert outcomes(report) == {image: Outcome.UNCHANGED}
    assert report.tags[0].detail == digest
    assert launch.launched == []


def test_a_refresh_does_not_keep_an_unused_image_alive(gateway: Gateway) -> None:
    image = gateway.image(unique("unused") + ":1")
    push(gateway, image.split("/", 1)[1], b"first")
    pull(gateway, image)
    before = lookup(gateway, image)
    push(gateway, image.split("/", 1)[1], b"second")

    assert outcomes(refresh(gateway, Pulls(gateway))) == {image: Outcome.PULL_STARTED}

    after = lookup(gateway, image)
    assert after["id"] != before["id"]
    assert after["expiration"] == before["expiration"], "a refresh is not a use: the image expires as it would have"


def test_tags_nobody_used_within_the_expiration_timeout_are_left_to_expire(gateway: Gateway) -> None:
    gateway.write_config(ImageExpirationTimeout="0:00:00:02")
    image = gateway.image(unique("old") + ":1")
    push(gateway, image.split("/", 1)[1], b"old")
    pull(gateway, image)
    push(gateway, image.split("/", 1)[1], b"moved")
    time.sleep(2.5)
    launch = Pulls(gateway)
    assert refresh(gateway, launch).tags == []
    assert launch.launched == []


def test_a_watched_tag_pattern_pulls_new_matches_and_ignores_the_rest(gateway: Gateway) -> None:
    repository = unique("team")
    push(gateway, f"{repository}:v1.0", b"v1.0")
    push(gateway, f"{repository}:v2.0", b"v2.0")
    watch_list(gateway).add("mycluster", gateway.image(f"{repository}:v1.*"), "ops")
    launch = Pulls(gateway)

    assert outcomes(refresh(gateway, launch)) == {gateway.image(f"{repository}:v1.0"): Outcome.PULL_STARTED}
    push(gateway, f"{repository}:v1.1", b"v1.1")
    assert outcomes(refresh(gateway, launch)) == {gateway.image(f"{repository}:v1.0"): Outcome.UNCHANGED,
                                                  gateway.image(f"{repository}:v1.1"): Outcome.PULL_STARTED}
    assert launch.launched == [gateway.image(f"{repository}:v1.0"), gateway.image(f"{repository}:v1.1")]
    assert lookup(gateway, gateway.image(f"{repository}:v1.1")) is not None
    assert lookup(gateway, gateway.image(f"{repository}:v2.0")) is None


def test_a_watched_image_is_held_ready(gateway: Gateway) -> None:
    image = gateway.image(unique("held") + ":1")
    push(gateway, image.split("/", 1)[1], b"held")
    watch_list(gateway).add("mycluster", image, "ops")
    refresh(gateway, Pulls(gateway))
    first = lookup(gateway, image)["expiration"]
    time.sleep(0.1)
    assert outcomes(refresh(gateway, Pulls(gateway))) == {image: Outcome.UNCHANGED}
    assert lookup(gateway, image)["expiration"] > first, "watched images do not expire while watched"


def test_private_images_are_not_refreshed_without_their_users_login(gateway: Gateway) -> None:
    image = gateway.image(unique("private") + ":1")
    push(gateway, image.split("/", 1)[1], b"private")
    pull(gateway, image)
    images = pymongo.MongoClient(gateway.mongo_uri)[gateway.database]["images"]
    images.update_one({"id": lookup(gateway, image)["id"]},
                      {"$set": Access(private=True, user_acl=(1000,)).fields()})
    push(gateway, image.split("/", 1)[1], b"private, moved")
    launch = Pulls(gateway)
    report = refresh(gateway, launch)
    assert outcomes(report) == {image: Outcome.SKIPPED}
    assert "login" in report.tags[0].detail
    assert launch.launched == []


def test_a_missing_repository_is_reported_and_the_rest_refreshed(gateway: Gateway) -> None:
    image = gateway.image(unique("fine") + ":1")
    push(gateway, image.split("/", 1)[1], b"fine")
    pull(gateway, image)
    watch_list(gateway).add("mycluster", gateway.image("refresh/never-pushed:v*"), "ops")
    report = refresh(gateway, Pulls(gateway))
    assert outcomes(report) == {gateway.image("refresh/never-pushed:v*"): Outcome.FAILED, image: Outcome.UNCHANGED}
    assert "repository unknown" in report.tags[0].detail


@pytest.fixture(autouse=True)
def _prefect(prefect_api: None) -> None:
    """The pulls run the real flow against the session's Prefect API."""
