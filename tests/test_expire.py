"""The expire flow, through a real Prefect API and store: expired images lose their files and are reported."""

from __future__ import annotations

import time

import pymongo
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

from flows.expire import expire_images
from imagegw.store import PullKey
from tests.gateway_fixtures import Gateway, pull
from testsupport.images import LayerBuilder, push_image


def test_images_past_their_expiration_lose_their_files_and_are_reported(gateway: Gateway) -> None:
    gateway.write_config(ImageExpirationTimeout="0:00:00:01")
    push_image(gateway.registry, "expire/old", "1", [LayerBuilder().file("x", b"old image\\n")])
    state, record = pull(gateway, gateway.image("expire/old:1"))
    assert state.is_completed(), record["status_message"]
    image_id = record["id"]
    size = (gateway.image_dir / f"{image_id}.squashfs").stat().st_size
    time.sleep(1.5)

    result = expire_images("mycluster", str(gateway.config_path))

    # The cache is far under its default cap (a quarter of the disk): the image's layers stay for the next pull.
    assert result == {"expired": [image_id], "bytes_freed": size, "failures_cleared": 0,
                      "layers_evicted": 0, "layer_bytes_evicted": 0, "leftovers_removed": 0,
                      "leftover_bytes_removed": 0}
    assert list(gateway.image_dir.iterdir()) == []
    assert gateway.store().lookup(PullKey("mycluster", "docker", gateway.image("expire/old:1"))) is None
    images = pymongo.MongoClient(gateway.mongo_uri)[gateway.database]["images"]
    assert images.find_one({"id": image_id})["status"] == "EXPIRED"
    with get_client(sync_client=True) as client:
        wanted = ArtifactFilter(key=ArtifactFilterKey(any_=["expire-mycluster"]))
        artifacts = client.read_artifacts(artifact_filter=wanted)
    assert artifacts and image_id in str(artifacts[-1].data)
    assert expire_images("mycluster", str(gateway.config_path))["expired"] == []  # nothing left to do
