"""Publishing over SFTP to a real sshd: atomic, verified, failing over, refusing hosts it does not know."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from pathlib import Path

import paramiko
import pytest

from imagegw.errors import TRANSIENT_ERRORS, RemoteAccessRefused, StorageError, TransferError
from imagegw.publish import RemotePublisher
from imagegw.sshconfig import RemoteAccess, SshHost
from testsupport.sshd import SshServer, dead_address, refusing_listener

IMAGE_ID = "ab" * 32


def host_of(address: str) -> SshHost:
    name, _, port = address.rpartition(":")
    return SshHost(name, int(port))


def access(server: SshServer, *hosts: SshHost, key: Path | None = None, **options: object) -> RemoteAccess:
    settings: dict[str, object] = {
        "hosts": hosts or (host_of(server.address),), "username": server.user,
        "key": key or server.keys.ed25519, "known_hosts": server.known_hosts, "connect_timeout": 5.0,
        **options,
    }
    return RemoteAccess(**settings)  # type: ignore[arg-type]


def built(tmp_path: Path, size: int = 3 << 20) -> Path:
    path = tmp_path / "image.squashfs"
    path.write_bytes(b"hsqs" + os.urandom(size - 4))
    return path


def leftovers(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.startswith("."))


@pytest.mark.parametrize("kind", ["rsa", "ed25519", "ecdsa", "encrypted"])
def test_an_image_is_published_with_its_meta_mode_0600_with_each_kind_of_key(
        sshd: SshServer, tmp_path: Path, kind: str) -> None:
    squashfs = built(tmp_path)
    image_dir = tmp_path / "remote-images"
    image_dir.mkdir()
    key = getattr(sshd.keys, kind)
    passphrase = sshd.keys.passphrase if kind == "encrypted" else None

    with RemotePublisher(access(sshd, key=key, key_passphrase=passphrase), image_dir) as publisher:
        assert not publisher.is_published(IMAGE_ID)
        published = publisher.publish(squashfs, "FORMAT: squashfs\n", IMAGE_ID)
        assert publisher.is_published(IMAGE_ID)

    remote = image_dir / f"{IMAGE_ID}.squashfs"
    assert published.size == squashfs.stat().st_size and published.squashfs == remote
    assert hashlib.sha256(remote.read_bytes()).digest() == hashlib.sha256(squashfs.read_bytes()).digest()
    assert (image_dir / f"{IMAGE_ID}.meta").read_text() == "FORMAT: squashfs\n"
    assert {stat.S_IMODE(path.stat().st_mode) for path in image_dir.iterdir()} == {0o600}
    assert leftovers(image_dir) == []


def test_unpublish_removes_both_remote_files(sshd: SshServer, tmp_path: Path) -> None:
    image_dir = tmp_path / "remote-images"
    image_dir.mkdir()
    with RemotePublisher(access(sshd), image_dir) as publisher:
        publisher.publish(built(tmp_path, 4096), "FORMAT: squashfs\n", IMAGE_ID)
        publisher.unpublish(IMAGE_ID)
        publisher.unpublish(IMAGE_ID)  # already gone: nothing to do
        assert not publisher.is_published(IMAGE_ID)
    assert os.listdir(image_dir) == []


def test_a_dead_and_a_non_ssh_host_are_skipped_for_the_next(sshd: SshServer, tmp_path: Path) -> None:
    image_dir = tmp_path / "remote-images"
    image_dir.mkdir()
    with refusing_listener() as not_ssh:
        hosts = (host_of(dead_address()), host_of(not_ssh.address), host_of(sshd.address))
        with RemotePublisher(access(sshd, *hosts), image_dir) as publisher:
            publisher.publish(built(tmp_path, 4096), "FORMAT: squashfs\n", IMAGE_ID)
            assert str(publisher).startswith(sshd.address)
    assert (image_dir / f"{IMAGE_ID}.meta").exists()


def test_when_every_host_fails_the_error_names_each_and_why(sshd: SshServer, tmp_path: Path) -> None:
    dead = dead_address()
    with refusing_listener() as not_ssh:
        publisher = RemotePublisher(access(sshd, host_of(dead), host_of(not_ssh.address)), tmp_path)
        with pytest.raises(TransferError) as caught:
            publisher.is_published(IMAGE_ID)

    message = str(caught.value)
    assert f"{dead}: connection refused" in message
    assert f"{not_ssh.address}: SSH failed" in message
    assert isinstance(caught.value, TRANSIENT_ERRORS)


def test_an_unknown_host_key_is_refused_naming_its_fingerprint(sshd: SshServer, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.touch()
    publisher = RemotePublisher(access(sshd, known_hosts=empty), tmp_path)

    with pytest.raises(RemoteAccessRefused, match=rf"{sshd.address}: unknown host key ssh-ed25519 SHA256:\S+, "
                                                  rf"not in {empty}"):
        publisher.is_published(IMAGE_ID)


def test_a_changed_host_key_is_refused_and_not_retried(sshd: SshServer, private_sshd: SshServer,
                                                       tmp_path: Path) -> None:
    # The shared server's known_hosts line, with the private server's port: another key for that host.
    lying = tmp_path / "known_hosts"
    lying.write_text(sshd.sshd.known_hosts_line().replace(f":{sshd.port} ", f":{private_sshd.port} ") + "\n")
    publisher = RemotePublisher(access(private_sshd, known_hosts=lying), tmp_path)

    with pytest.raises(RemoteAccessRefused, match=r"host key changed: it offers ssh-ed25519 SHA256:\S+, .* holds "
                                                  r"SHA256:\S+; refusing it") as caught:
        publisher.is_published(IMAGE_ID)

    assert not isinstance(caught.value, TRANSIENT_ERRORS)


def test_host_key_checking_is_off_only_when_asked(sshd: SshServer, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.touch()

    with RemotePublisher(access(sshd, known_hosts=empty, check_host_keys=False), tmp_path) as publisher:
        assert not publisher.is_published(IMAGE_ID)


def test_a_key_the_host_does_not_accept_is_refused(sshd: SshServer, tmp_path: Path) -> None:
    from testsupport.sshd import generate_user_key

    stranger = generate_user_key(tmp_path / "stranger", "ed25519")
    publisher = RemotePublisher(access(sshd, key=stranger), tmp_path)

    with pytest.raises(RemoteAccessRefused, match=f"{sshd.user} was not let in with the key {stranger}"):
        publisher.is_published(IMAGE_ID)


def test_a_connection_cut_mid_transfer_leaves_no_file_under_a_final_name_and_a_retry_starts_clean(
        private_sshd: SshServer, tmp_path: Path) -> None:
    squashfs = built(tmp_path, 256 << 20)
    image_dir = tmp_path / "remote-images"
    image_dir.mkdir()
    publisher = RemotePublisher(access(private_sshd), image_dir)

    def cut_once_the_copy_is_under_way() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            partials = [path for path in image_dir.iterdir() if path.name.endswith(".partial")]
            if partials and partials[0].stat().st_size > 0:
                private_sshd.sshd.kill_sessions()
                return
            time.sleep(0.005)

    cutter = threading.Thread(target=cut_once_the_copy_is_under_way)
    cutter.start()
    with pytest.raises(TransferError, match=f"{private_sshd.address}:{image_dir}: the connection to "
                                            f"{private_sshd.address} broke while publishing image {IMAGE_ID}"):
        publisher.publish(squashfs, "FORMAT: squashfs\n", IMAGE_ID)
    cutter.join()
    assert not (image_dir / f"{IMAGE_ID}.squashfs").exists() and not (image_dir / f"{IMAGE_ID}.meta").exists()

    with publisher:  # the retry: a new connection, which first removes what the broken one left
        publisher.publish(squashfs, "FORMAT: squashfs\n", IMAGE_ID)

    assert (image_dir / f"{IMAGE_ID}.squashfs").stat().st_size == squashfs.stat().st_size
    assert leftovers(image_dir) == []


def test_a_temporary_file_whose_removal_failed_is_removed_by_the_next_connection(
        sshd: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    squashfs = built(tmp_path)
    image_dir = tmp_path / "remote-images"
    image_dir.mkdir()
    publisher = RemotePublisher(access(sshd), image_dir)

    def corrupted(*args: object) -> None:
        raise TransferError("the copy arrived corrupted")

    def broke_while_removing(*args: object) -> None:
        raise EOFError  # the connection still looked alive, as one cut a moment ago can (seen in CI)

    with monkeypatch.context() as breaking:
        breaking.setattr(RemotePublisher, "_verify", corrupted)
        breaking.setattr(paramiko.SFTPClient, "remove", broke_while_removing)
        with pytest.raises(TransferError, match="corrupted"):
            publisher.publish(squashfs, "FORMAT: squashfs\n", IMAGE_ID)
    assert len(leftovers(image_dir)) == 1
    publisher.close()

    with publisher:
        publisher.publish(squashfs, "FORMAT: squashfs\n", IMAGE_ID)

    assert leftovers(image_dir) == []


def test_a_full_remote_directory_is_a_storage_error_and_leaves_nothing(sshd: SshServer, tmp_path: Path,
                                                                       small_disk: Path) -> None:
    with RemotePublisher(access(sshd), small_disk) as publisher:
        with pytest.raises(StorageError, match=f"^{sshd.address}:{small_disk}: No space left on device "
                                               f"\\(publishing image {IMAGE_ID}\\)$") as caught:
            publisher.publish(built(tmp_path, 1 << 20), "FORMAT: squashfs\n", IMAGE_ID)

    assert os.listdir(small_disk) == []
    assert not isinstance(caught.value, TRANSIENT_ERRORS)
