"""Faults of the services a pull depends on, through the real parts: a registry that stalls, the Prefect
server restarted and the image index (MongoDB) stopped while a pull runs. Each test checks what the user
sees, what the pull's record says, and what is left on disk."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.gateway_fixtures import Gateway as GatewayFixture
from tests.gateway_fixtures import pull
from testsupport.faulty import FaultyProxy
from testsupport.images import LayerBuilder, push_image

REGISTRY_TIMEOUT = 2
"""RegistryTimeout in these tests: a stalled blob fails in 2 s, not the default 60."""


@pytest.fixture
def stalling(gateway: GatewayFixture) -> Iterator[FaultyProxy]:
    """The session's registry behind a proxy that can stall blobs, configured as a location with a short timeout."""
    with FaultyProxy(gateway.registry.url) as proxy:
        gateway.write_config(Locations={proxy.host: {"url": proxy.url}}, RegistryTimeout=REGISTRY_TIMEOUT)
        proxy.stall_blobs_after = 100_000  # in the middle of the layer; the image config, smaller, gets through
        yield proxy


def left_on_disk(gateway: GatewayFixture) -> list[str]:
    """Files a failed pull may not leave: layers or partial downloads, scratch, published images."""
    roots = [gateway.cache_dir / "layers", gateway.root / "expand", gateway.image_dir]
    return sorted(str(path) for root in roots if root.exists() for path in root.rglob("*") if path.is_file())


def test_a_registry_stalling_mid_blob_fails_the_pull_after_its_retries_naming_it(
        gateway: GatewayFixture, stalling: FaultyProxy) -> None:
    built = push_image(gateway.registry, "faults/stall", "1", [LayerBuilder().file("f", os.urandom(1 << 20))],
                       compression="none")
    stalling.stalls = 100

    state, record = pull(gateway, f"{stalling.host}/faults/stall:1")

    assert state.is_failed() and record["status"] == "FAILURE"
    message = record["status_message"]
    assert f"layer {built.layer_digests[0]} of {stalling.host}/faults/stall" in message, message
    assert f"no answer within {REGISTRY_TIMEOUT} s (RegistryTimeout)" in message, message
    assert stalling.stalled == 3, "tried, then retried twice"
    assert left_on_disk(gateway) == []


def test_a_registry_stalling_once_is_retried_and_the_pull_succeeds(gateway: GatewayFixture,
                                                                   stalling: FaultyProxy) -> None:
    push_image(gateway.registry, "faults/pause", "1", [LayerBuilder().file("f", os.urandom(1 << 20))],
               compression="none")
    stalling.stalls = 1

    state, record = pull(gateway, f"{stalling.host}/faults/pause:1")

    assert state.is_completed() and record["status"] == "READY", record["status_message"]
    assert stalling.stalled == 1
    assert (gateway.image_dir / f"{record['id']}.squashfs").is_file()
