"""The image index on the gateway's embedded SecantusDB: stages, READY records, tags."""

from __future__ import annotations

import uuid

import pymongo
import pytest

from imagegw.index import ImageFacts, ImageIndex, PullKey, Status, to_response

KEY = PullKey("mycluster", "docker", "team/app:1")


@pytest.fixture
def index(mongo_uri: str) -> ImageIndex:
    index = ImageIndex(pymongo.MongoClient(mongo_uri)[f"t_{uuid.uuid4().hex[:10]}"], expiration_timeout=3600)
    index.ensure_indexes()
    return index


def facts(image_id: str) -> ImageFacts:
    return ImageFacts(id=image_id, manifest_digest="sha256:" + image_id, registry="r:5000", repository="team/app",
                      arch="amd64", os="linux", size=4096, layers=["sha256:aa"], env=["PATH=/bin"],
                      entry=["/run"], cmd=None, workdir="/", labels={"a": "b"})


def test_a_pull_moves_through_its_stages_and_lookups_see_only_ready_images(index: ImageIndex) -> None:
    assert index.begin_pull(KEY)["status"] == "PENDING"
    index.set_stage(KEY, Status.CONVERSION, "Building squashfs")

    assert index.pull_record(KEY)["status"] == "CONVERSION"
    assert index.lookup(KEY) is None

    index.publish(KEY, facts("1" * 64))

    assert index.lookup(KEY)["id"] == "1" * 64
    assert index.pull_record(KEY)["status"] == "READY"


def test_failure_keeps_the_message(index: ImageIndex) -> None:
    index.begin_pull(KEY)

    index.fail_pull(KEY, "manifest unknown: r:5000/team/app:1")

    assert index.pull_record(KEY)["status_message"] == "manifest unknown: r:5000/team/app:1"


def test_response_has_shifter_fields_and_missing_ones_say_missing(index: ImageIndex) -> None:
    index.begin_pull(KEY)

    response = to_response(index.pull_record(KEY))

    assert response["id"] == "MISSING" and response["status"] == "PENDING"
    assert response["tag"] == ["team/app:1"] and response["ENV"] == "MISSING"
    assert "_id" not in response


def test_expiration_is_set_on_publish(index: ImageIndex) -> None:
    record = index.publish(KEY, facts("2" * 64))

    assert record["expiration"] == pytest.approx(record["last_pull"] + 3600)
