"""The registry client, first against a scriptable local HTTP server, then against Debian's docker-registry."""

from __future__ import annotations

import functools
import json
import os
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from imagegw.config import Location
from imagegw.errors import (
    DigestMismatch,
    ManifestUnknown,
    NoMatchingPlatform,
    RegistryError,
    RegistryUnauthorized,
    RegistryUnreachable,
    UnsupportedManifest,
)
from imagegw.processes import free_port
from imagegw.registry.client import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    PlatformSpec,
    RegistryClient,
)
from imagegw.registry.credentials import Credential
from imagegw.registry.reference import ImageRef
from tests.fake_registry import (
    FakeImage,
    FakeRegistry,
    Reply,
    Seen,
    client_for,
    json_reply,
    location_of,
    ref_to,
    registry_error,
    sha256,
    tar_of,
)
from testsupport.images import LayerBuilder, push_image, push_index
from testsupport.registry import RunningRegistry

# --------------------------------------------------------------------------- manifests (fake server)


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, DOCKER_MANIFEST])
def test_resolves_a_single_manifest(fake: FakeRegistry, media_type: str) -> None:
    built = fake.image("team/app", "1.0", [tar_of("a", b"1"), tar_of("b", b"2")], media_type=media_type)
    with client_for(fake) as client:
        image = client.resolve(ref_to(fake, "team/app"), PlatformSpec())
    assert image.manifest_digest == built.digest
    assert image.manifest_media_type == media_type
    assert image.image_id == built.digest.removeprefix("sha256:")
    assert image.config == built.config
    assert image.diff_ids == tuple(built.diff_ids)
    assert [layer.digest for layer in image.layers] == [sha256(blob) for blob in built.blobs]
    assert [layer.size for layer in image.layers] == [len(blob) for blob in built.blobs]
    accept = fake.seen[0].headers["accept"]
    assert all(kind in accept for kind in (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))


def test_single_manifest_of_another_architecture_is_resolved(fake: FakeRegistry) -> None:
    fake.image("x", "1.0", [tar_of("a", b"1")], architecture="ppc64le")
    with client_for(fake) as client:
        image = client.resolve(ref_to(fake, "x"), PlatformSpec(architecture="arm64"))
    assert image.config["architecture"] == "ppc64le"


def test_pull_by_digest_checks_the_bytes(fake: FakeRegistry) -> None:
    built = fake.image("x", None, [tar_of("a", b"1")])
    with client_for(fake) as client:
        assert client.resolve(ref_to(fake, "x", None, built.digest), PlatformSpec()).manifest_digest == built.digest
        other = "sha256:" + "0" * 64
        fake.serve(f"/v2/x/manifests/{other}", json.dumps(built.manifest).encode(), {"Content-Type": OCI_MANIFEST})
        with pytest.raises(DigestMismatch, match=f"asked for {other}"):
            client.resolve(ref_to(fake, "x", None, other), PlatformSpec())


def test_docker_content_digest_is_verified(fake: FakeRegistry) -> None:
    built = fake.image("x", None, [tar_of("a", b"1")])
    fake.serve("/v2/x/manifests/1.0", json.dumps(built.manifest).encode(),
               {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": "sha256:" + "1" * 64})
    with client_for(fake) as client, pytest.raises(DigestMismatch, match=r"manifest of .*/x:1\.0"):
        client.resolve(ref_to(fake, "x"), PlatformSpec())


def test_config_digest_is_verified(fake: FakeRegistry) -> None:
    built = fake.image("x", "1.0", [tar_of("a", b"1")])
    fake.serve(f"/v2/x/blobs/{built.manifest['config']['digest']}", b'{"rootfs": {"diff_ids": []}}')
    with client_for(fake) as client, pytest.raises(DigestMismatch, match="image config of"):
        client.resolve(ref_to(fake, "x"), PlatformSpec())


@pytest.mark.parametrize("media_type", ["application/vnd.docker.distribution.manifest.v1+prettyjws",
                                        "application/vnd.docker.distribution.manifest.v1+json"])
def test_schema1_is_refused_clearly(fake: FakeRegistry, media_type: str) -> None:
    fake.manifest("old", ["1.0"], {"schemaVersion": 1, "name": "old", "fsLayers": []}, media_type)
    with client_for(fake) as client, pytest.raises(UnsupportedManifest, match="schema 1"):
        client.resolve(ref_to(fake, "old"), PlatformSpec())


def test_non_image_artifact_is_refused(fake: FakeRegistry) -> None:
    config = fake.blob("chart", b"{}")
    fake.manifest("chart", ["1.0"], {"schemaVersion": 2, "layers": [], "config": {
        "mediaType": "application/vnd.cncf.helm.config.v1+json", "digest": config, "size": 2}}, OCI_MANIFEST)
    with client_for(fake) as client, pytest.raises(UnsupportedManifest, match="not a container image"):
        client.resolve(ref_to(fake, "chart"), PlatformSpec())


def test_layer_digest_that_is_not_sha256_is_refused(fake: FakeRegistry) -> None:
    built = fake.image("x", "1.0", [tar_of("a", b"1")])
    built.manifest["layers"][0]["digest"] = "sha256:../../../etc/passwd"
    fake.manifest("x", ["1.0"], built.manifest, OCI_MANIFEST)
    with client_for(fake) as client, pytest.raises(UnsupportedManifest, match="not a sha256 digest"):
        client.resolve(ref_to(fake, "x"), PlatformSpec())


# --------------------------------------------------------------------------- index (fake server)


@pytest.fixture
def multiarch(fake: FakeRegistry) -> dict[str, FakeImage]:
    """An index of amd64, arm64/v8, arm/v7, arm/v6, ppc64le plus an attestation; tag ``multi``."""
    images = {name: fake.image("multi", None, [tar_of("arch", name.encode())])
              for name in ("amd64", "arm64", "armv7", "armv6", "ppc64le", "attestation")}
    entries = [
        images["attestation"].index_entry("unknown", "unknown", annotations={
            "vnd.docker.reference.type": "attestation-manifest"}),
        images["amd64"].index_entry(),
        images["arm64"].index_entry(architecture="arm64", variant="v8"),
        images["armv6"].index_entry(architecture="arm", variant="v6"),
        images["armv7"].index_entry(architecture="arm", variant="v7"),
        images["ppc64le"].index_entry(architecture="ppc64le"),
    ]
    fake.manifest("multi", ["multi"], {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, OCI_INDEX)
    return images


@pytest.mark.parametrize(("platform", "expected"), [
    (PlatformSpec(), "amd64"),
    (PlatformSpec(architecture="x86_64"), "amd64"),
    (PlatformSpec(architecture="arm64"), "arm64"),
    (PlatformSpec(architecture="arm64", variant="v8"), "arm64"),
    (PlatformSpec(architecture="arm", variant="v7"), "armv7"),
    (PlatformSpec(architecture="arm"), "armv6"),  # no variant asked: the first arm entry
    (PlatformSpec(architecture="ppc64le"), "ppc64le"),
])
def test_index_entry_for_the_platform(fake: FakeRegistry, multiarch: dict[str, FakeImage], platform: PlatformSpec,
                                      expected: str) -> None:
    with client_for(fake) as client:
        image = client.resolve(ref_to(fake, "multi", "multi"), platform)
    assert image.manifest_digest == multiarch[expected].digest
    assert image.manifest_media_type == OCI_MANIFEST


def test_index_prefers_the_entry_without_variant(fake: FakeRegistry) -> None:
    with_variant = fake.image("arm", None, [tar_of("v", b"5")], architecture="arm", variant="v5")
    plain = fake.image("arm", None, [tar_of("v", b"none")], architecture="arm")
    entries = [with_variant.index_entry(architecture="arm", variant="v5"), plain.index_entry(architecture="arm")]
    fake.manifest("arm", ["1.0"], {"schemaVersion": 2, "manifests": entries}, DOCKER_MANIFEST_LIST)
    with client_for(fake) as client:
        assert client.resolve(ref_to(fake, "arm"), PlatformSpec(architecture="arm")).manifest_digest == plain.digest


def test_index_without_the_platform_lists_what_it_offers(fake: FakeRegistry, multiarch: dict[str, FakeImage]) -> None:
    with client_for(fake) as client, pytest.raises(NoMatchingPlatform) as caught:
        client.resolve(ref_to(fake, "multi", "multi"), PlatformSpec(architecture="riscv64"))
    assert str(caught.value) == (
        f"no image for linux/riscv64 in {fake.host}/multi:multi "
        "(index offers linux/amd64, linux/arm64/v8, linux/arm/v6, linux/arm/v7, linux/ppc64le)"
    )
    with client_for(fake) as client, pytest.raises(NoMatchingPlatform, match="no image for linux/arm/v5 in"):
        client.resolve(ref_to(fake, "multi", "multi"), PlatformSpec(architecture="arm", variant="v5"))


def test_index_entry_is_fetched_by_digest_and_verified(fake: FakeRegistry) -> None:
    built = fake.image("x", None, [tar_of("a", b"1")])
    fake.manifest("x", ["1.0"], {"schemaVersion": 2, "manifests": [built.index_entry()]}, OCI_INDEX)
    fake.serve(f"/v2/x/manifests/{built.digest}", b'{"schemaVersion": 2, "layers": []}', {"Content-Type": OCI_MANIFEST})
    with client_for(fake) as client, pytest.raises(DigestMismatch):
        client.resolve(ref_to(fake, "x"), PlatformSpec())


# --------------------------------------------------------------------------- HTTP errors (fake server)


@pytest.mark.parametrize(("reply", "error", "message"), [
    (registry_error(404, "MANIFEST_UNKNOWN", "manifest unknown"), ManifestUnknown, "manifest unknown: {host}/x/y:1.0"),
    (registry_error(404, "NAME_UNKNOWN", "repository name not known"), ManifestUnknown,
     "repository unknown: {host}/x/y:1.0"),
    ((404, {}, b"<html>not here</html>"), ManifestUnknown, "manifest unknown: {host}/x/y:1.0"),
    (registry_error(503, "UNAVAILABLE", "maintenance"), RegistryUnreachable,
     "registry {host} failed with HTTP 503 for {host}/x/y:1.0: UNAVAILABLE: maintenance"),
    (registry_error(429, "TOOMANYREQUESTS", "slow down"), RegistryUnreachable,
     "registry {host} is rate-limiting pulls (HTTP 429) of {host}/x/y:1.0; retry later"),
    (registry_error(400, "NAME_INVALID", "invalid repository name"), RegistryError,
     "registry {host} answered HTTP 400 for {host}/x/y:1.0: NAME_INVALID: invalid repository name"),
    ((403, {}, b""), RegistryUnauthorized, "registry {host} refused {host}/x/y:1.0 to anonymous access (HTTP 403)"),
])
def test_error_replies(fake: FakeRegistry, reply: Reply, error: type[Exception], message: str) -> None:
    fake.routes["/v2/x/y/manifests/1.0"] = lambda seen: reply
    with client_for(fake) as client, pytest.raises(error) as caught:
        client.resolve(ref_to(fake, "x/y"), PlatformSpec())
    assert type(caught.value) is error
    assert str(caught.value).startswith(message.format(host=fake.host))


def test_nothing_listening_is_unreachable() -> None:
    host = f"127.0.0.1:{free_port()}"
    location = Location(name="gone", url=f"http://{host}")
    with RegistryClient(location) as client, pytest.raises(RegistryUnreachable) as caught:
        client.resolve(ImageRef(location, "x", "1"), PlatformSpec())
    assert str(caught.value).startswith(f"registry {host} unreachable: connection refused")
    assert f"{host}/x:1" in str(caught.value)


def test_tls_registry_is_trusted_through_its_ca_file(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = FakeRegistry(tls=context)
    try:
        built = server.image("x", "1.0", [tar_of("a", b"1")])
        with client_for(server) as client, pytest.raises(RegistryError) as caught:
            client.resolve(ref_to(server, "x"), PlatformSpec())
        assert type(caught.value) is RegistryError, "not transient: retrying cannot help"
        assert str(caught.value).startswith(f"registry {server.host} unreachable: TLS certificate not trusted")
        with client_for(server, cacert=str(cert)) as client:
            assert client.resolve(ref_to(server, "x", cacert=str(cert)), PlatformSpec()).manifest_digest == built.digest
    finally:
        server.stop()


def test_slow_registry_times_out(fake: FakeRegistry) -> None:
    def slow(seen: Seen) -> Reply:
        time.sleep(1)
        return registry_error(404, "MANIFEST_UNKNOWN", "late")
    fake.routes["/v2/x/manifests/1.0"] = slow
    with RegistryClient(location_of(fake), timeout=0.2) as client, pytest.raises(RegistryUnreachable,
                                                                                  match="no answer within 0.2 s"):
        client.resolve(ref_to(fake, "x"), PlatformSpec())


# --------------------------------------------------------------------------- authentication (fake server)


def bearer_protected(fake: FakeRegistry, scope_in_challenge: bool) -> list[str]:
    """Guard every /v2/ route by a token from /token; returns the tokens issued so far."""
    issued: list[str] = []

    def token(seen: Seen) -> Reply:
        issued.append(f"tok{len(issued)}")
        return json_reply(200, {"access_token": issued[-1], "expires_in": 60})
    for path, route in list(fake.routes.items()):
        def guarded(seen: Seen, route: Callable[[Seen], Reply] = route, path: str = path) -> Reply:
            if issued and seen.headers.get("authorization") == f"Bearer {issued[-1]}":
                return route(seen)
            repository = path.split("/")[2]
            challenge = f'Bearer realm="{fake.url}/token",service="fake"'
            if scope_in_challenge:
                challenge += f',scope="repository:{repository}:pull"'
            return 401, {"WWW-Authenticate": challenge}, b""
        fake.routes[path] = guarded
    fake.routes["/token"] = token
    return issued


@pytest.mark.parametrize("scope_in_challenge", [True, False])
def test_anonymous_token_flow(fake: FakeRegistry, scope_in_challenge: bool) -> None:
    built = fake.image("x", "1.0", [tar_of("a", b"1")])
    bearer_protected(fake, scope_in_challenge)
    with client_for(fake) as client:
        assert client.resolve(ref_to(fake, "x"), PlatformSpec()).manifest_digest == built.digest
        assert read_blob(client, "x", sha256(built.blobs[0])) == built.blobs[0]
    token_requests = [seen for seen in fake.seen if seen.path == "/token"]
    assert len(token_requests) == 1, "the token is cached for the repository scope"
    assert token_requests[0].query == {"scope": ["repository:x:pull"], "service": ["fake"]}
    assert "authorization" not in token_requests[0].headers


def test_token_flow_with_credentials_and_refresh(fake: FakeRegistry) -> None:
    built = fake.image("x", "1.0", [tar_of("a", b"1")])
    issued = bearer_protected(fake, True)
    with client_for(fake, username="alice", password="s3cr3t") as client:
        client.resolve(ref_to(fake, "x"), PlatformSpec())
        issued.append("rotated")  # the cached token stops working, as when it expires
        assert client.resolve(ref_to(fake, "x"), PlatformSpec()).manifest_digest == built.digest
    token_requests = [seen for seen in fake.seen if seen.path == "/token"]
    assert len(token_requests) == 2
    assert token_requests[0].headers["authorization"] == "Basic YWxpY2U6czNjcjN0"  # alice:s3cr3t


def test_token_service_refusing_credentials(fake: FakeRegistry) -> None:
    fake.image("x", "1.0", [tar_of("a", b"1")])
    bearer_protected(fake, True)
    fake.routes["/token"] = lambda seen: registry_error(401, "UNAUTHORIZED", "bad password")
    with client_for(fake, username="alice", password="wrong-pw") as client, \
            pytest.raises(RegistryUnauthorized) as caught:
        client.resolve(ref_to(fake, "x"), PlatformSpec())
    assert str(caught.value) == (f"authentication failed for {fake.host} (credential from location 'test' in the "
                                 f"configuration): its token service refused it for {fake.host}/x:1.0")


def basic_protected(fake: FakeRegistry) -> None:
    for path, route in list(fake.routes.items()):
        def guarded(seen: Seen, route: Callable[[Seen], Reply] = route) -> Reply:
            if seen.headers.get("authorization") == "Basic YWxpY2U6czNjcjN0":
                return route(seen)
            return 401, {"WWW-Authenticate": 'Basic realm="fake"'}, b""
        fake.routes[path] = guarded


def test_basic_challenge(fake: FakeRegistry) -> None:
    built = fake.image("x", "1.0", [tar_of("a", b"1")])
    basic_protected(fake)
    with client_for(fake, username="alice", password="s3cr3t") as client:
        assert client.resolve(ref_to(fake, "x"), PlatformSpec()).manifest_digest == built.digest
    assert len(fake.seen) == 3, "one 401, then the manifest and the config with the remembered credentials"


def test_basic_challenge_without_credentials(fake: FakeRegistry) -> None:
    fake.image("x", "1.0", [tar_of("a", b"1")])
    basic_protected(fake)
    with client_for(fake) as client, pytest.raises(RegistryUnauthorized) as caught:
        client.resolve(ref_to(fake, "x"), PlatformSpec())
    assert str(caught.value).startswith(f"registry {fake.host} requires credentials to pull {fake.host}/x:1.0; "
                                        "no credential was found for it")
    assert "username and password of location 'test'" in str(caught.value)


def test_basic_with_wrong_password_never_shows_it(fake: FakeRegistry) -> None:
    fake.image("x", "1.0", [tar_of("a", b"1")])
    basic_protected(fake)
    with client_for(fake, username="alice", password="hunter2") as client, \
            pytest.raises(RegistryUnauthorized) as caught:
        client.resolve(ref_to(fake, "x"), PlatformSpec())
    assert str(caught.value).startswith(f"authentication failed for {fake.host} (credential from location 'test' "
                                        "in the configuration)")
    assert "hunter2" not in str(caught.value) and "alice" not in str(caught.value)


def test_basic_location_sends_credentials_first(fake: FakeRegistry) -> None:
    fake.image("x", "1.0", [tar_of("a", b"1")])
    basic_protected(fake)
    with client_for(fake, auth_method="basic", username="alice", password="s3cr3t") as client:
        client.resolve(ref_to(fake, "x"), PlatformSpec())
    assert len(fake.seen) == 2, "no 401 round trip"


# --------------------------------------------------------------------------- redirects (fake servers)


def test_blob_redirect_drops_authorization(fake: FakeRegistry) -> None:
    store = FakeRegistry()
    try:
        data = b"layer bytes"
        digest = store.blob("x", data)
        fake.routes[f"/v2/x/blobs/{digest}"] = lambda seen: (307, {"Location": f"{store.url}/v2/x/blobs/{digest}"}, b"")
        fake.routes["/v2/x/manifests/1.0"] = lambda seen: registry_error(404, "MANIFEST_UNKNOWN", "")
        basic_protected(fake)
        with client_for(fake, auth_method="basic", username="alice", password="s3cr3t") as client:
            assert read_blob(client, "x", digest) == data
    finally:
        store.stop()
    assert fake.seen[0].headers["authorization"].startswith("Basic ")
    assert [seen.path for seen in store.seen] == [f"/v2/x/blobs/{digest}"]
    assert "authorization" not in store.seen[0].headers


def redirect(target: str, seen: Seen) -> Reply:
    return 302, {"Location": target}, b""


def test_relative_redirects_are_followed_up_to_five_times(fake: FakeRegistry) -> None:
    data = b"bytes"
    digest = sha256(data)
    for hop in range(5):
        fake.routes[f"/hop{hop}"] = functools.partial(redirect, f"/hop{hop + 1}")
    fake.serve("/hop5", data)
    fake.routes[f"/v2/x/blobs/{digest}"] = lambda seen: (302, {"Location": "/hop1"}, b"")
    with client_for(fake) as client:
        assert read_blob(client, "x", digest) == data
    fake.routes[f"/v2/x/blobs/{digest}"] = lambda seen: (302, {"Location": "/hop0"}, b"")
    with client_for(fake) as client, pytest.raises(RegistryError, match="redirected more than 5 times"):
        read_blob(client, "x", digest)


def test_missing_blob(fake: FakeRegistry) -> None:
    digest = "sha256:" + "2" * 64
    fake.routes[f"/v2/x/blobs/{digest}"] = lambda seen: registry_error(404, "BLOB_UNKNOWN", "blob unknown to registry")
    with client_for(fake) as client, pytest.raises(RegistryError) as caught:
        read_blob(client, "x", digest)
    assert str(caught.value) == f"blob {digest} is missing from {fake.host}/x (BLOB_UNKNOWN: blob unknown to registry)"


# --------------------------------------------------------------------------- blob bytes (fake server)


def read_blob(client: RegistryClient, repository: str, digest: str) -> bytes:
    with client.blob_chunks(repository, digest, 1024) as chunks:
        return b"".join(chunks)


def test_blob_chunks_are_the_stored_bytes(fake: FakeRegistry) -> None:
    data = os.urandom(5000)
    digest = fake.blob("x", data)
    with client_for(fake) as client, client.blob_chunks("x", digest, 1024) as chunks:
        received = list(chunks)
    assert b"".join(received) == data
    assert max(len(chunk) for chunk in received) <= 1024
    (request,) = fake.seen
    assert request.headers["accept-encoding"] == "identity", "no transfer encoding may alter the digested bytes"


def test_blob_cut_mid_stream_is_unreachable(fake: FakeRegistry) -> None:
    data = os.urandom(300_000)
    digest = sha256(data)
    fake.routes[f"/v2/x/blobs/{digest}"] = lambda seen: (200, {"Content-Length": str(len(data))}, data[:200_000])
    received: list[bytes] = []
    with client_for(fake) as client, pytest.raises(RegistryUnreachable) as caught, \
            client.blob_chunks("x", digest, 65536) as chunks:
        received.extend(chunks)
    assert str(caught.value) == (f"download of layer {digest} of {fake.host}/x interrupted: "
                                 "connection broken mid-transfer")
    arrived = b"".join(received)
    assert arrived and data.startswith(arrived), "the chunks before the cut did arrive"


def recorded_responses(client: RegistryClient, monkeypatch: pytest.MonkeyPatch) -> list[requests.Response]:
    """The responses ``client`` gets from now on, to see whether their connections were closed."""
    responses: list[requests.Response] = []
    request = client._session.request

    def recording_request(*args: Any, **kwargs: Any) -> requests.Response:
        responses.append(request(*args, **kwargs))
        return responses[-1]
    monkeypatch.setattr(client._session, "request", recording_request)
    return responses


def test_blob_connection_is_closed_however_the_block_ends(fake: FakeRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(4 << 20)  # far more than the socket buffers hold: the reply is still being sent
    digest = fake.blob("x", data)
    with client_for(fake) as client:
        responses = recorded_responses(client, monkeypatch)
        with client.blob_chunks("x", digest, 1024) as chunks:
            assert next(chunks) == data[:1024]  # the consumer stops early
        assert responses[-1].raw.closed
        with pytest.raises(KeyError), client.blob_chunks("x", digest, 1024) as chunks:
            next(chunks)
            raise KeyError("the consumer fails")
        assert responses[-1].raw.closed
        assert read_blob(client, "x", digest) == data
        assert responses[-1].raw.closed
    assert len(responses) == 3


# --------------------------------------------------------------------------- the real registry


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("media", ["oci", "docker"])
def test_real_registry_manifest(registry: RunningRegistry, media: str) -> None:
    repository = unique("test/app")
    built = push_image(registry, repository, "1.0", [LayerBuilder().file("etc/hello", b"hi\n")], media=media,
                       env=["A=1"], entrypoint=["/bin/sh"], cmd=["-c", "true"], workdir="/srv", labels={"k": "v"})
    with client_for(registry) as client:
        image = client.resolve(ref_to(registry, repository), PlatformSpec())
    assert image.manifest_digest == built.manifest_digest
    assert image.manifest_media_type == built.manifest_media_type
    assert image.config == built.config
    assert image.config["config"]["WorkingDir"] == "/srv"
    assert list(image.diff_ids) == built.diff_ids
    assert [layer.digest for layer in image.layers] == built.layer_digests


@pytest.mark.parametrize("media", ["oci", "docker"])
def test_real_registry_index(registry: RunningRegistry, media: str) -> None:
    repository = unique("test/multi")
    amd64 = push_image(registry, repository, None, [LayerBuilder().file("arch", b"amd64")], media=media)
    arm64 = push_image(registry, repository, None, [LayerBuilder().file("arch", b"arm64")], media=media,
                       architecture="arm64", variant="v8")
    index_digest = push_index(registry, repository, "1.0", [amd64, arm64], media=media)
    with client_for(registry) as client:
        assert client.resolve(ref_to(registry, repository), PlatformSpec()).manifest_digest == amd64.manifest_digest
        for platform in (PlatformSpec(architecture="arm64"), PlatformSpec(architecture="arm64", variant="v8")):
            assert client.resolve(ref_to(registry, repository), platform).manifest_digest == arm64.manifest_digest
        by_digest = client.resolve(ref_to(registry, repository, None, index_digest), PlatformSpec())
        assert by_digest.manifest_digest == amd64.manifest_digest
        # What a refresh compares: the tag names the index, and one HEAD tells its digest.
        assert client.resolve(ref_to(registry, repository), PlatformSpec()).tag_digest == index_digest
        assert client.tag_digest(ref_to(registry, repository)) == index_digest
        with pytest.raises(NoMatchingPlatform) as caught:
            client.resolve(ref_to(registry, repository), PlatformSpec(architecture="ppc64le"))
    assert str(caught.value) == (f"no image for linux/ppc64le in {registry.host}/{repository}:1.0 "
                                 "(index offers linux/amd64, linux/arm64/v8)")


def test_real_registry_pull_by_digest(registry: RunningRegistry) -> None:
    repository = unique("test/digest")
    built = push_image(registry, repository, None, [LayerBuilder().file("f", b"by digest")])
    with client_for(registry) as client:
        image = client.resolve(ref_to(registry, repository, None, built.manifest_digest), PlatformSpec())
    assert image.manifest_digest == built.manifest_digest
    assert str(image.ref) == f"{registry.host}/{repository}@{built.manifest_digest}"


def test_real_registry_unknown_tag_and_repository(registry: RunningRegistry) -> None:
    repository = unique("test/known")
    push_image(registry, repository, "1.0", [LayerBuilder().file("f", b"known")])
    with client_for(registry) as client:
        with pytest.raises(ManifestUnknown) as unknown_tag:
            client.resolve(ref_to(registry, repository, "2.0"), PlatformSpec())
        with pytest.raises(ManifestUnknown) as unknown_repository:
            client.resolve(ref_to(registry, "test/never-pushed"), PlatformSpec())
    assert str(unknown_tag.value) == f"manifest unknown: {registry.host}/{repository}:2.0"
    assert str(unknown_repository.value) == f"repository unknown: {registry.host}/test/never-pushed:1.0"


def test_real_registry_stopped(tmp_path_factory: pytest.TempPathFactory) -> None:
    own = RunningRegistry.start(tmp_path_factory.mktemp("stopped-registry"))
    try:
        push_image(own, "test/app", "1.0", [LayerBuilder().file("f", b"x")])
        with client_for(own) as client:
            client.resolve(ref_to(own, "test/app"), PlatformSpec())
            own.stop()
            with pytest.raises(RegistryUnreachable) as caught:
                client.resolve(ref_to(own, "test/app"), PlatformSpec())
    finally:
        own.stop()
    assert str(caught.value).startswith(f"registry {own.host} unreachable: connection refused")


def test_real_basic_registry(basic_registry: RunningRegistry) -> None:
    repository = unique("test/private")
    built = push_image(basic_registry, repository, "1.0", [LayerBuilder().file("f", b"private")])
    user, password = basic_registry.credentials or ("", "")
    with client_for(basic_registry, username=user, password=password) as client:
        image = client.resolve(ref_to(basic_registry, repository), PlatformSpec())
        assert sha256(read_blob(client, repository, image.layers[0].digest)) == built.layer_digests[0]
    assert image.manifest_digest == built.manifest_digest
    with client_for(basic_registry) as client, pytest.raises(RegistryUnauthorized, match="requires credentials"):
        client.resolve(ref_to(basic_registry, repository), PlatformSpec())
    with client_for(basic_registry, username=user, password="not-" + password) as client, \
            pytest.raises(RegistryUnauthorized) as caught:
        client.resolve(ref_to(basic_registry, repository), PlatformSpec())
    assert password not in str(caught.value)


def test_real_token_registry(token_registry: RunningRegistry) -> None:
    assert token_registry.token_server is not None
    repository = unique("test/tokens")
    built = push_image(token_registry, repository, "1.0", [LayerBuilder().file("f", b"token")])
    issued_before = len(token_registry.token_server.requests)
    with client_for(token_registry) as client:
        image = client.resolve(ref_to(token_registry, repository), PlatformSpec())
        assert sha256(read_blob(client, repository, image.layers[0].digest)) == built.layer_digests[0]
    assert image.manifest_digest == built.manifest_digest
    assert token_registry.token_server.requests[issued_before:] == [(None, f"repository:{repository}:pull")]
    user, password = token_registry.credentials or ("", "")
    with client_for(token_registry, username=user, password=password) as client:
        image = client.resolve(ref_to(token_registry, repository), PlatformSpec())
    assert image.manifest_digest == built.manifest_digest
    assert token_registry.token_server.requests[-1] == (user, f"repository:{repository}:pull")
    with client_for(token_registry, username=user, password="not-" + password) as client, \
            pytest.raises(RegistryUnauthorized) as caught:
        client.resolve(ref_to(token_registry, repository), PlatformSpec())
    assert str(caught.value) == (f"authentication failed for {token_registry.host} (credential from location 'test' "
                                 f"in the configuration): its token service refused it for "
                                 f"{token_registry.host}/{repository}:1.0")


def test_kept_configs_spare_the_blob_request_and_are_checked(fake: FakeRegistry, tmp_path: Path) -> None:
    fake.image("team/app", "1.0", [tar_of("a", b"1")])
    configs = tmp_path / "configs"

    def resolve() -> dict[str, Any]:
        with RegistryClient(location_of(fake), timeout=5, config_cache=configs) as client:
            return client.resolve(ref_to(fake, "team/app"), PlatformSpec()).config

    first = resolve()
    blob_gets = len(fake.paths("/v2/team/app/blobs/"))
    assert resolve() == first
    assert len(fake.paths("/v2/team/app/blobs/")) == blob_gets

    (kept,) = configs.iterdir()
    kept.write_bytes(b'{"tampered": true}')
    assert resolve() == first
    assert len(fake.paths("/v2/team/app/blobs/")) == blob_gets + 1


# --------------------------------------------------------------------------- what a refresh asks


def test_tag_digest_costs_one_head_request(fake: FakeRegistry) -> None:
    image = fake.image("team/app", "1.0", [tar_of("a", b"a")])
    with client_for(fake) as client:
        assert client.tag_digest(ref_to(fake, "team/app")) == image.digest
    assert [(seen.method, seen.path) for seen in fake.seen] == [("HEAD", "/v2/team/app/manifests/1.0")]


def test_tag_digest_without_a_digest_header_reads_the_manifest(fake: FakeRegistry) -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
    fake.serve("/v2/team/app/manifests/1.0", body, {"Content-Type": OCI_MANIFEST})
    with client_for(fake) as client:
        assert client.tag_digest(ref_to(fake, "team/app")) == sha256(body)
    assert [seen.method for seen in fake.seen] == ["HEAD", "GET"]


def test_tag_digest_of_a_missing_tag(fake: FakeRegistry) -> None:
    fake.routes["/v2/team/app/manifests/9"] = lambda seen: registry_error(404, "MANIFEST_UNKNOWN", "unknown")
    with client_for(fake) as client, pytest.raises(ManifestUnknown, match="team/app:9"):
        client.tag_digest(ref_to(fake, "team/app", "9"))


def test_tag_list_follows_the_registry_pagination(fake: FakeRegistry) -> None:
    pages = {"": (["1.0", "1.1"], "/v2/team/app/tags/list?n=2&last=1.1"), "1.1": (["2.0"], None)}

    def tag_page(seen: Seen) -> Reply:
        tags, following = pages[seen.query.get("last", [""])[0]]
        headers = {"Link": f'<{following}>; rel="next"'} if following else {}
        return json_reply(200, {"name": "team/app", "tags": tags}, headers)

    fake.routes["/v2/team/app/tags/list"] = tag_page
    with client_for(fake) as client:
        assert client.tags("team/app") == ["1.0", "1.1", "2.0"]
    assert len(fake.paths("/v2/team/app/tags/list")) == 2


def test_tag_list_of_an_unknown_repository(fake: FakeRegistry) -> None:
    fake.routes["/v2/team/none/tags/list"] = lambda seen: registry_error(404, "NAME_UNKNOWN", "no such repository")
    with client_for(fake) as client, pytest.raises(ManifestUnknown, match="repository unknown: .*team/none"):
        client.tags("team/none")


def test_real_registry_tag_list(registry: RunningRegistry) -> None:
    repository = unique("test/tags")
    for tag in ("v1.0", "v1.1", "v2.0"):
        push_image(registry, repository, tag, [LayerBuilder().file("tag", tag.encode())])
    with client_for(registry) as client:
        assert sorted(client.tags(repository)) == ["v1.0", "v1.1", "v2.0"]


# --------------------------------------------------------------------------- identity and registry tokens


def credential_client(server: RunningRegistry, credential: Credential) -> RegistryClient:
    return RegistryClient(location_of(server), credential=credential, timeout=5)


def test_real_token_registry_with_an_identity_token(token_registry: RunningRegistry) -> None:
    tokens = token_registry.token_server
    assert tokens is not None and token_registry.credentials is not None
    repository = unique("test/identity")
    built = push_image(token_registry, repository, "1.0", [LayerBuilder().file("f", b"identity")])
    identity = tokens.issue_refresh_token(token_registry.credentials[0])
    grants = len(tokens.grants)
    with credential_client(token_registry, Credential("docker config", identity_token=identity)) as client:
        assert client.resolve(ref_to(token_registry, repository), PlatformSpec()).manifest_digest == \
            built.manifest_digest
    assert tokens.grants[grants:] == ["refresh_token"], "one OAuth2 refresh-token grant, then the token is reused"
    wrong = Credential("environment IMAGEGW_REGISTRY_*_CI", identity_token="not-" + identity)
    with credential_client(token_registry, wrong) as client, pytest.raises(RegistryUnauthorized) as caught:
        client.resolve(ref_to(token_registry, repository), PlatformSpec())
    assert str(caught.value).startswith(f"authentication failed for {token_registry.host} "
                                        "(credential from environment IMAGEGW_REGISTRY_*_CI)")
    assert identity not in str(caught.value)


def test_real_token_registry_with_a_registry_token(token_registry: RunningRegistry) -> None:
    tokens = token_registry.token_server
    assert tokens is not None and token_registry.credentials is not None
    repository = unique("test/regtoken")
    built = push_image(token_registry, repository, "1.0", [LayerBuilder().file("f", b"registry token")])
    token = tokens.issue_token(token_registry.credentials[0], [f"repository:{repository}:pull"])
    issued = len(tokens.requests)
    with credential_client(token_registry, Credential("flag --registry-token", registry_token=token)) as client:
        image = client.resolve(ref_to(token_registry, repository), PlatformSpec())
        assert sha256(read_blob(client, repository, image.layers[0].digest)) == built.layer_digests[0]
    assert len(tokens.requests) == issued, "a registry token is sent as it is, never exchanged"


def test_tokens_are_reused_until_they_expire_then_renewed(token_registry: RunningRegistry) -> None:
    tokens = token_registry.token_server
    assert tokens is not None and token_registry.credentials is not None
    repository = unique("test/expiry")
    built = push_image(token_registry, repository, "1.0", [LayerBuilder().file("f", b"expiring")])
    user, password = token_registry.credentials
    tokens.advertised_ttl = 12  # renewed when within 10 s of expiring: good for 2 s
    try:
        with credential_client(token_registry, Credential("test", username=user, password=password)) as client:
            issued = len(tokens.requests)
            image = client.resolve(ref_to(token_registry, repository), PlatformSpec())
            read_blob(client, repository, image.layers[0].digest)
            assert len(tokens.requests) == issued + 1, "one token served the manifest, config and layer"
            time.sleep(2.5)
            assert sha256(read_blob(client, repository, image.layers[0].digest)) == built.layer_digests[0]
            assert len(tokens.requests) == issued + 2, "the expiring token was renewed before it was sent"
    finally:
        tokens.advertised_ttl = 300
