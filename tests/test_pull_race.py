"""A pull request that meets the publish of the tag's running pull: between its lookup (no image yet) and its
claim (the pull just READY). It is answered with the image, and no second pull starts."""

from __future__ import annotations

from typing import Any

import pytest

from imagegw.access import AclRequest
from imagegw.service import Caller, Gateway
from imagegw.store import ImageFacts, PullKey
from tests.gateway_fixtures import Gateway as GatewayFixture

ROOT = Caller(uid=0, gid=0)
IMAGE_ID = "c" * 64


class NotedLaunches:
    """A launcher that starts nothing: it notes each pull it is asked to start."""

    def __init__(self) -> None:
        self.pull_ids: list[str] = []

    def __call__(self, key: PullKey, pull_id: str) -> str:
        self.pull_ids.append(pull_id)
        return f"flow-run-{len(self.pull_ids)}"

    def end_dead_run(self, flow_run_id: str, reason: str) -> None:
        raise AssertionError(f"no run is dead here: {flow_run_id} ({reason})")


def test_a_request_meeting_the_publish_of_the_tags_pull_gets_its_image_and_starts_no_other(
        gateway: GatewayFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    launches = NotedLaunches()
    service = Gateway(gateway.settings, launches)
    tag = gateway.image("race/app:1")
    key = PullKey("mycluster", "docker", tag)
    assert service.pull(ROOT, "mycluster", "docker", tag, AclRequest())["status"] in ("INIT", "PENDING")
    [running] = launches.pull_ids
    store = service.store()
    looked_up = store.lookup

    def lookup_then_publish(asked: PullKey) -> dict[str, Any] | None:
        found = looked_up(asked)
        monkeypatch.setattr(store, "lookup", looked_up)
        # The running pull's index stage, just after this lookup found nothing.
        store.publish(key, ImageFacts(id=IMAGE_ID, manifest_digest=f"sha256:{IMAGE_ID}", registry=gateway.registry.host,
                                      repository="race/app", arch="amd64", os="linux", size=4096, layers=[], env=[],
                                      entry=None, cmd=None, workdir="/", labels={}), pull_id=running)
        return found

    monkeypatch.setattr(store, "lookup", lookup_then_publish)
    answer = service.pull(ROOT, "mycluster", "docker", tag, AclRequest())

    assert (answer["status"], answer["id"], answer["status_message"]) == ("READY", IMAGE_ID, "Image ready")
    assert launches.pull_ids == [running]
    assert store.pull_record(key)["pull_id"] == running
