"""Registry push notifications: the real docker-registry tells the gateway's API of a push, and a watched
tag is pulled with no refresh run; a notification without the shared secret is refused."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pymongo
import pytest
import requests
import uvicorn
from fastapi.testclient import TestClient

from api.app import create_app
from imagegw.config import load_settings
from imagegw.processes import free_port
from imagegw.service.notify import PushedTag, pushed_tags
from imagegw.store import PullKey
from imagegw.store.watchlist import WatchList
from tests.api_fixtures import ThreadLauncher
from tests.gateway_fixtures import Gateway
from testsupport.images import LayerBuilder, push_image
from testsupport.registry import Notify, RunningRegistry

SECRET = "notify-" + uuid.uuid4().hex
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass
class NotifiedGateway:
    gateway: Gateway
    registry: RunningRegistry
    """A registry that sends its notifications to the gateway's API."""
    api: str
    launcher: ThreadLauncher

    def watch(self, image: str) -> None:
        WatchList(pymongo.MongoClient(self.gateway.mongo_uri)[self.gateway.database]).add("mycluster", image, "ops")

    def image(self, repository_and_tag: str) -> str:
        return f"{self.registry.host}/{repository_and_tag}"

    def lookup(self, image: str) -> dict | None:
        return self.gateway.store().lookup(PullKey("mycluster", "docker", image))


@pytest.fixture
def notified(gateway: Gateway, tmp_path: Path) -> Iterator[NotifiedGateway]:
    port = free_port()
    registry = RunningRegistry.start(tmp_path / "notifying-registry",
                                     notify=Notify(f"http://127.0.0.1:{port}/api/notify", f"Bearer {SECRET}"))
    gateway.write_config(NotifySecret=SECRET, Locations={registry.host: {"url": registry.url}})
    launcher = ThreadLauncher(str(gateway.config_path))
    server = uvicorn.Server(uvicorn.Config(create_app(load_settings(gateway.config_path), launcher),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield NotifiedGateway(gateway, registry, f"http://127.0.0.1:{port}", launcher)
    finally:
        server.should_exit = True
        thread.join(10)
        registry.stop()
        launcher.wait()


def test_a_pushed_tag_the_watch_list_matches_is_pulled_at_once(notified: NotifiedGateway) -> None:
    notified.watch(notified.image("team/app:v1.*"))
    push_image(notified.registry, "team/app", "v1.0", [LayerBuilder().file("v", b"1.0")])
    push_image(notified.registry, "team/app", "v2.0", [LayerBuilder().file("v", b"2.0")])

    deadline = time.monotonic() + 60
    while notified.lookup(notified.image("team/app:v1.0")) is None and time.monotonic() < deadline:
        time.sleep(0.3)

    record = notified.lookup(notified.image("team/app:v1.0"))
    assert record is not None and record["status"] == "READY", "the push was not pulled within a minute"
    assert (notified.gateway.image_dir / f"{record['id']}.squashfs").is_file()
    assert [key.tag for key in notified.launcher.launched] == [notified.image("team/app:v1.0")], \
        "only the matching tag is pulled, once"


def test_a_notification_without_the_secret_is_refused(notified: NotifiedGateway) -> None:
    notified.watch(notified.image("team/app:v1.*"))
    event = distribution_push(notified.registry.host, "team/app", "v1.0")
    for authorization in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": SECRET[:-1]}):
        response = requests.post(f"{notified.api}/api/notify", json=event, headers=authorization, timeout=10)
        assert response.status_code == 401
        assert "NotifySecret" in response.json()["error"]
    assert notified.launcher.launched == []

    harbor = {"type": "PUSH_ARTIFACT", "event_data": {
        "repository": {"repo_full_name": "team/app"},
        "resources": [{"tag": "v1.5", "resource_url": notified.image("team/app:v1.5")}]}}
    response = requests.post(f"{notified.api}/api/notify", json=harbor, headers={"Authorization": SECRET},
                             timeout=10)
    assert response.status_code == 200
    assert [pull["image"] for pull in response.json()["pulls"]] == [notified.image("team/app:v1.5")]


def test_notifications_are_off_without_a_secret(gateway: Gateway) -> None:
    with TestClient(create_app(load_settings(gateway.config_path), ThreadLauncher(str(gateway.config_path)))) as api:
        response = api.post("/api/notify", json={"events": []}, headers={"Authorization": "Bearer anything"})
    assert response.status_code == 403
    assert "NotifySecret" in response.json()["error"]


def distribution_push(host: str, repository: str, tag: str, media_type: str = MANIFEST,
                      action: str = "push") -> dict:
    target = {"mediaType": media_type, "repository": repository, "digest": "sha256:" + "0" * 64,
              "url": f"http://{host}/v2/{repository}/manifests/sha256:{'0' * 64}"}
    if tag:
        target["tag"] = tag
    return {"events": [{"action": action, "target": target, "request": {"host": host}}]}


def test_only_tagged_manifest_pushes_count() -> None:
    blob = distribution_push("reg:5000", "team/app", "", "application/vnd.oci.image.layer.v1.tar+gzip")
    untagged = distribution_push("reg:5000", "team/app", "")
    pulled = distribution_push("reg:5000", "team/app", "v1", action="pull")
    tagged = distribution_push("reg:5000", "team/app", "v1")
    events = {"events": [event for body in (blob, untagged, pulled, tagged) for event in body["events"]]}
    assert pushed_tags(events) == [PushedTag(frozenset({"reg:5000"}), "team/app", "v1")]
    assert pushed_tags({"type": "DELETE_ARTIFACT", "event_data": {}}) == []
