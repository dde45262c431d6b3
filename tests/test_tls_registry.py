"""A private registry behind TLS with a private CA, through the real pipeline: trusted only through its sslcacert."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.gateway_fixtures import Gateway, pull
from testsupport.images import LayerBuilder, push_image
from testsupport.registry import RunningRegistry
from testsupport.tls import make_private_ca

USERS = {"carol": "tls-s3cret"}


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    workdir = tmp_path_factory.mktemp("tls-registry")
    registry = RunningRegistry.start(workdir / "registry", htpasswd_users=USERS, tls=make_private_ca(workdir / "ca"))
    yield registry
    registry.stop()


def test_a_private_image_behind_tls_is_pulled_with_the_sites_ca(gateway: Gateway,
                                                                tls_registry: RunningRegistry) -> None:
    assert tls_registry.tls is not None
    push_image(tls_registry, "tls/app", "1", [LayerBuilder().file("secure", b"over TLS")])
    site = {"url": tls_registry.url, "username": "carol", "password": USERS["carol"]}
    image = f"{tls_registry.host}/tls/app:1"

    gateway.write_config(Locations={tls_registry.host: site})
    state, record = pull(gateway, image)
    assert state.is_failed() and record["status"] == "FAILURE"
    assert record["status_message"].startswith(f"registry {tls_registry.host} unreachable: TLS certificate not trusted")

    gateway.write_config(Locations={tls_registry.host: {**site, "sslcacert": str(tls_registry.tls.ca_cert)}})
    state, record = pull(gateway, image)
    assert state.is_completed(), record["status_message"]
    assert (gateway.image_dir / f"{record['id']}.squashfs").is_file()
