"""A remote platform end to end: pulls published over SSH to a real sshd, looked up, expired; a full disk there."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from imagegw.errors import BadRequest
from imagegw.service import Caller, Gateway
from imagegw.store import PullKey
from tests.gateway_fixtures import Gateway as GatewayFixture
from tests.gateway_fixtures import pull
from tests.squashfs_reader import read_tree
from testsupport.images import LayerBuilder, push_image
from testsupport.sshd import SshServer, dead_address

ROOT = Caller(uid=0, gid=0)


def remote_platform(sshd: SshServer, image_dir: Path, *hosts: str) -> dict[str, Any]:
    return {"accesstype": "remote", "admins": ["root"], "host": list(hosts) or [sshd.address],
            "ssh": {"username": sshd.user, "key": str(sshd.keys.rsa), "imageDir": str(image_dir),
                    "knownHosts": str(sshd.known_hosts), "connectTimeout": 5}}


def never_launched(key: PullKey, pull_id: str) -> str:
    raise AssertionError(f"no flow run was expected for {key}")


def test_a_pull_is_published_over_ssh_through_the_first_host_that_answers(
        gateway: GatewayFixture, sshd: SshServer, tmp_path: Path) -> None:
    remote_dir = tmp_path / "cluster-images"
    remote_dir.mkdir()
    gateway.write_config(Platforms={"mycluster": remote_platform(sshd, remote_dir, dead_address(), sshd.address)})
    layer = LayerBuilder().dir("etc").file("etc/hello.txt", b"hello over ssh\n")
    built = push_image(gateway.registry, "test/remote", "1", [layer], env=["A=1"])
    image_id = built.manifest_digest.removeprefix("sha256:")

    state, record = pull(gateway, gateway.image("test/remote:1"))

    assert state.is_completed(), record["status_message"]
    assert record["status"] == "READY" and record["id"] == image_id
    assert sorted(os.listdir(remote_dir)) == [f"{image_id}.meta", f"{image_id}.squashfs"]
    assert read_tree(remote_dir / f"{image_id}.squashfs")["etc/hello.txt"].data == b"hello over ssh\n"
    assert "ENV: A=1" in (remote_dir / f"{image_id}.meta").read_text().splitlines()

    # A re-pull finds the image on the remote side and converts nothing.
    state, record = pull(gateway, gateway.image("test/remote:1"))
    assert state.is_completed() and record["status"] == "READY"

    gateway_service = Gateway(gateway.settings, never_launched)
    gateway_service.expire(ROOT, "mycluster", "docker", gateway.image("test/remote:1"))
    assert os.listdir(remote_dir) == []
    assert gateway.store().lookup(PullKey("mycluster", "docker", gateway.image("test/remote:1"))) is None


def test_a_full_remote_disk_fails_the_pull_and_the_tags_previous_image_is_still_served(
        gateway: GatewayFixture, sshd: SshServer, small_disk: Path) -> None:
    # maxImageBytes set: by default (the disk's free space) the image would be refused before it is built.
    gateway.write_config(Platforms={"mycluster": remote_platform(sshd, small_disk)}, Limits={"maxImageBytes": "1G"})
    tag = gateway.image("test/grows:latest")
    first = push_image(gateway.registry, "test/grows", "latest", [LayerBuilder().file("small", b"fits\n")])
    state, record = pull(gateway, tag)
    assert state.is_completed(), record["status_message"]
    push_image(gateway.registry, "test/grows", "latest", [LayerBuilder().file("big", os.urandom(1 << 20))])

    state, record = pull(gateway, tag)

    assert state.is_failed()
    assert record["status"] == "FAILURE"
    assert record["status_message"].startswith(f"{sshd.address}:{small_disk}: No space left on device")
    first_id = first.manifest_digest.removeprefix("sha256:")
    assert gateway.store().lookup(PullKey("mycluster", "docker", tag))["id"] == first_id
    assert sorted(os.listdir(small_disk)) == [f"{first_id}.meta", f"{first_id}.squashfs"]


def test_import_on_a_remote_platform_is_refused_saying_why(gateway: GatewayFixture, sshd: SshServer,
                                                           tmp_path: Path) -> None:
    gateway.write_config(Platforms={"mycluster": remote_platform(sshd, tmp_path)}, ImportUsers=["root"])

    with pytest.raises(BadRequest, match="publishes over SSH to .*: doimport takes files on the gateway host only"):
        Gateway(gateway.settings, never_launched).import_image(ROOT, "mycluster", "custom", "mine:1",
                                                               {"filepath": "/tmp/x.squashfs"})
