"""The test-support tools work against real Debian docker-registry processes."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import socket
import subprocess
import tarfile
from pathlib import Path

import paramiko
import pytest
import requests
import zstandard

from testsupport.images import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    BuiltImage,
    LayerBuilder,
    RegistryError,
    fetch_manifest,
    parse_challenge,
    push_blob,
    push_image,
    push_index,
    sample_image_layers,
)
from testsupport.registry import RegistryStartError, RunningRegistry, find_registry_binary
from testsupport.sshd import SshServer, UserKeys, dead_address, generate_user_key, refusing_listener

ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])
DECOMPRESS = {
    "gzip": gzip.decompress,
    "zstd": lambda data: zstandard.ZstdDecompressor().decompressobj().decompress(data),
    "none": lambda data: data,
}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def get(registry: RunningRegistry, path: str, **kwargs: object) -> requests.Response:
    """Plain GET with the registry's credentials (if any)."""
    response = requests.get(f"{registry.url}{path}", auth=registry.credentials, timeout=10, **kwargs)
    response.raise_for_status()
    return response


def check_roundtrip(registry: RunningRegistry, image: BuiltImage, compressions: list[str]) -> None:
    """Manifest, config and layers fetched back match what push_image reported."""
    reference = image.tag or image.manifest_digest
    manifest = get(registry, f"/v2/{image.repository}/manifests/{reference}", headers={"Accept": ACCEPT})
    assert manifest.headers["Content-Type"] == image.manifest_media_type
    assert manifest.headers["Docker-Content-Digest"] == image.manifest_digest == sha256(manifest.content)
    assert manifest.content == image.manifest
    parsed = json.loads(manifest.content)
    assert [layer["digest"] for layer in parsed["layers"]] == image.layer_digests
    config = get(registry, f"/v2/{image.repository}/blobs/{parsed['config']['digest']}").content
    assert json.loads(config) == image.config
    assert image.config["rootfs"]["diff_ids"] == image.diff_ids
    for digest, diff_id, compression in zip(image.layer_digests, image.diff_ids, compressions):
        blob = get(registry, f"/v2/{image.repository}/blobs/{digest}").content
        assert sha256(blob) == digest
        assert sha256(DECOMPRESS[compression](blob)) == diff_id


@pytest.mark.parametrize(
    ("media", "compression"),
    [("oci", "gzip"), ("oci", "zstd"), ("docker", "gzip"), ("oci", ["zstd", "none"])],
)
def test_push_image_roundtrip(registry: RunningRegistry, media: str, compression: str | list[str]) -> None:
    tag = f"{media}-{'-'.join(compression) if isinstance(compression, list) else compression}"
    image = push_image(
        registry, "test/sample", tag, sample_image_layers(), compression=compression, media=media,
        entrypoint=["/usr/local/bin/entrypoint.sh"], cmd=["/bin/hello"], labels={"org.example": "x"},
    )
    assert image.manifest_media_type == (OCI_MANIFEST if media == "oci" else DOCKER_MANIFEST)
    per_layer = compression if isinstance(compression, list) else [compression] * 2
    check_roundtrip(registry, image, per_layer)
    assert image.config["config"]["Entrypoint"] == ["/usr/local/bin/entrypoint.sh"]


def test_push_by_digest_only(registry: RunningRegistry) -> None:
    image = push_image(registry.url, "test/untagged", None, [LayerBuilder().file("a", b"A")])
    check_roundtrip(registry, image, ["gzip"])
    assert image.reference == f"test/untagged@{image.manifest_digest}"


def test_docker_manifests_refuse_zstd(registry: RunningRegistry) -> None:
    with pytest.raises(ValueError, match="zstd"):
        push_image(registry, "test/bad", "x", [LayerBuilder()], compression="zstd", media="docker")


@pytest.mark.parametrize("media", ["oci", "docker"])
def test_push_index_lists_both_platforms(registry: RunningRegistry, media: str) -> None:
    layers = [LayerBuilder().file("etc/arch", b"any\n")]
    amd64 = push_image(registry, "test/multi", None, layers, media=media)
    arm64 = push_image(registry, "test/multi", None, layers, media=media, architecture="arm64", variant="v8")
    digest = push_index(registry, "test/multi", f"{media}-index", [amd64, arm64], media=media)
    response = get(registry, f"/v2/test/multi/manifests/{media}-index", headers={"Accept": ACCEPT})
    assert response.headers["Content-Type"] == (OCI_INDEX if media == "oci" else DOCKER_MANIFEST_LIST)
    assert sha256(response.content) == digest
    entries = json.loads(response.content)["manifests"]
    assert [(e["digest"], e["platform"]) for e in entries] == [
        (amd64.manifest_digest, {"architecture": "amd64", "os": "linux"}),
        (arm64.manifest_digest, {"architecture": "arm64", "os": "linux", "variant": "v8"}),
    ]


def test_layer_builder_members_in_order() -> None:
    hostile = tarfile.TarInfo("../../escape")
    hostile.size = 3
    layer = (
        LayerBuilder()
        .dir("etc").file("etc/x", b"x", 0o600).symlink("etc/l", "/etc/x").hardlink("etc/h", "etc/x")
        .whiteout("etc/old").opaque("var/lib").fifo("run/p").chardev("dev/null")
        .raw(hostile, b"bad")
    )
    with tarfile.open(fileobj=io.BytesIO(layer.tar())) as archive:
        members = archive.getmembers()
        assert [m.name for m in members] == [
            "etc", "etc/x", "etc/l", "etc/h", "etc/.wh.old", "var/lib/.wh..wh..opq",
            "run/p", "dev/null", "../../escape",
        ]
        assert members[1].mode == 0o600 and members[2].linkname == "/etc/x" and members[3].islnk()
        assert members[6].isfifo() and (members[7].devmajor, members[7].devminor) == (1, 3)
        assert archive.extractfile(members[8]).read() == b"bad"  # type: ignore[union-attr]


def test_basic_registry_requires_alice(basic_registry: RunningRegistry) -> None:
    anonymous = requests.get(f"{basic_registry.url}/v2/", timeout=10)
    assert anonymous.status_code == 401
    assert parse_challenge(anonymous.headers["WWW-Authenticate"])[0] == "basic"
    assert basic_registry.credentials == ("alice", "s3cr3t")
    image = push_image(basic_registry, "test/basic", "v1", sample_image_layers())
    check_roundtrip(basic_registry, image, ["gzip", "gzip"])
    with pytest.raises(RegistryError, match="401"):
        push_image(basic_registry.url, "test/basic", "anon", [LayerBuilder()])
    with pytest.raises(RegistryError, match="401"):
        push_image(basic_registry, "test/basic", "bad", [LayerBuilder()], auth=("alice", "wrong"))


def test_token_registry_anonymous_pull_and_authenticated_push(token_registry: RunningRegistry) -> None:
    server = token_registry.token_server
    assert server is not None
    image = push_image(token_registry, "test/token", "v1", sample_image_layers())
    assert ("alice", "repository:test/token:pull,push") in server.requests

    # Anonymous pull by hand: challenge, anonymous token, retry.
    url = f"{token_registry.url}/v2/test/token/manifests/v1"
    challenge = requests.get(url, headers={"Accept": ACCEPT}, timeout=10)
    assert challenge.status_code == 401
    scheme, params = parse_challenge(challenge.headers["WWW-Authenticate"])
    assert (scheme, params["scope"]) == ("bearer", "repository:test/token:pull")
    answer = requests.get(
        params["realm"], params={"service": params["service"], "scope": params["scope"]}, timeout=10
    ).json()
    pulled = requests.get(url, headers={"Accept": ACCEPT, "Authorization": f"Bearer {answer['token']}"}, timeout=10)
    assert pulled.status_code == 200 and sha256(pulled.content) == image.manifest_digest
    assert answer["access_token"] == answer["token"]
    assert (None, "repository:test/token:pull") in server.requests
    assert fetch_manifest(token_registry.url, "test/token", "v1")[0] == image.manifest

    with pytest.raises(RegistryError, match="insufficient_scope|UNAUTHORIZED"):
        push_image(token_registry.url, "test/token", "anon", [LayerBuilder()])
    wrong = requests.get(params["realm"], params={"scope": params["scope"]}, auth=("alice", "nope"), timeout=10)
    assert wrong.status_code == 401


def test_blob_path_is_the_stored_file(registry: RunningRegistry) -> None:
    data = b"blob for blob_path\n"
    digest = push_blob(registry, "test/blobs", data)
    assert digest == sha256(data)
    path = registry.blob_path(digest)
    assert path.is_file() and path.read_bytes() == data


def test_stop_refuses_connections(tmp_path: Path) -> None:
    with RunningRegistry.start(tmp_path) as short_lived:
        push_blob(short_lived, "test/stop", b"x")
        assert (tmp_path / "registry.log").stat().st_size > 0
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{short_lived.url}/v2/", timeout=5)
    short_lived.stop()  # idempotent
    assert not short_lived.running


def test_missing_binary_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    find_registry_binary()
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RegistryStartError, match="apt-get install docker-registry"):
        find_registry_binary()


def ssh_connect(server: SshServer, key: Path, passphrase: str | None = None,
                known_hosts: Path | None = None) -> paramiko.SSHClient:
    """Log in with ``key`` only, trusting only the host keys in ``known_hosts`` (the server's by default)."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts or server.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    try:
        client.connect(server.host, server.port, server.user, key_filename=str(key), passphrase=passphrase,
                       allow_agent=False, look_for_keys=False, timeout=5, banner_timeout=5, auth_timeout=5)
    except BaseException:
        client.close()
        raise
    return client


def remote_sha256(client: paramiko.SSHClient, path: str) -> str:
    _, stdout, stderr = client.exec_command(f"sha256sum {path}", timeout=5)
    assert stdout.channel.recv_exit_status() == 0, stderr.read()
    return "sha256:" + stdout.read().decode().split()[0]


@pytest.mark.parametrize("kind", ["rsa", "ed25519", "ecdsa", "encrypted"])
def test_sshd_sftp_put_with_each_key_type(sshd: SshServer, tmp_path: Path, kind: str) -> None:
    key = getattr(sshd.keys, kind)
    passphrase = sshd.keys.passphrase if kind == "encrypted" else None
    data = f"uploaded with {kind}\n".encode() * 1000
    remote = str(tmp_path / f"{kind}.bin")
    with ssh_connect(sshd, key, passphrase) as client, client.open_sftp() as sftp:
        with sftp.open(remote, "wb") as handle:
            handle.write(data)
        assert sftp.stat(remote).st_size == len(data)
        assert remote_sha256(client, remote) == sha256(data)
    assert sshd.user == "root" and sshd.address == f"127.0.0.1:{sshd.port}"


def test_sshd_rejects_unknown_host_and_unauthorized_key(sshd: SshServer, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        ssh_connect(sshd, sshd.keys.ed25519, known_hosts=empty)
    stranger = generate_user_key(tmp_path / "id_stranger", "ed25519")
    assert Path(f"{stranger}.pub").read_text().endswith(" imagegw-test\n")
    with pytest.raises(paramiko.AuthenticationException):
        ssh_connect(sshd, stranger)
    with pytest.raises(paramiko.SSHException):
        ssh_connect(sshd, sshd.keys.encrypted, passphrase="wrong horse")


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no OpenSSH client (apt-get install openssh-client)")
def test_openssh_client_accepts_known_hosts_line(sshd: SshServer) -> None:
    assert sshd.known_hosts.read_text() == sshd.sshd.known_hosts_line() + "\n"
    assert sshd.sshd.known_hosts_line().startswith(f"[127.0.0.1]:{sshd.port} ssh-ed25519 AAAA")
    result = subprocess.run(
        ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={sshd.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
         "-o", "IdentitiesOnly=yes", "-i", str(sshd.keys.rsa), "-p", str(sshd.port),
         f"{sshd.user}@127.0.0.1", "echo", "ok"],
        capture_output=True, timeout=20, check=False,
    )
    assert (result.returncode, result.stdout) == (0, b"ok\n"), result.stderr


def test_kill_sessions_cuts_live_sftp_then_stop_refuses(private_sshd: SshServer, ssh_user_keys: UserKeys,
                                                         tmp_path: Path) -> None:
    client = ssh_connect(private_sshd, ssh_user_keys.ecdsa)
    sftp = client.open_sftp()
    sftp.get_channel().settimeout(5)  # type: ignore[union-attr]
    handle = sftp.open(str(tmp_path / "partial"), "wb")
    handle.write(b"x" * 65536)
    handle.flush()
    assert private_sshd.sshd.kill_sessions() == 1
    with pytest.raises((OSError, EOFError, paramiko.SSHException)):
        handle.write(b"y" * 65536)
        handle.flush()
        sftp.stat(str(tmp_path / "partial"))
    client.close()
    assert private_sshd.sshd.session_pids() == []

    with ssh_connect(private_sshd, ssh_user_keys.ed25519) as again:  # the listener survived the cut
        assert remote_sha256(again, "/dev/null") == sha256(b"")
        assert private_sshd.sshd.running and len(private_sshd.sshd.session_pids()) == 1
        private_sshd.stop()
        assert not private_sshd.sshd.running and private_sshd.sshd.session_pids() == []
    with pytest.raises(paramiko.ssh_exception.NoValidConnectionsError):
        ssh_connect(private_sshd, ssh_user_keys.ed25519)
    private_sshd.stop()  # idempotent
    assert "Accepted publickey" in private_sshd.sshd.log_tail(100)


@pytest.mark.parametrize("banner", [b"", b"HTTP/1.1 400 Bad Request\r\n\r\n"])
def test_refusing_listener_and_dead_address_fail_fast(banner: bytes) -> None:
    with refusing_listener(banner) as listener:
        transport = paramiko.Transport(("127.0.0.1", listener.port))
        with pytest.raises(paramiko.SSHException):
            transport.start_client(timeout=5)
        transport.close()
        assert listener.accepted == 1 and listener.address == f"127.0.0.1:{listener.port}"
    host, _, port = dead_address().partition(":")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=5)
