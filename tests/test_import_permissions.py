"""doimport reads a file only if its caller could: real users, groups, directories and POSIX ACLs.

The gateway opens the file as the caller, so the kernel decides: search permission on every parent
directory, ACLs and supplementary groups count, as they would for the user's own ``cat``.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagegw.errors import Forbidden, ServiceUnavailable
from imagegw.publish import asuser
from imagegw.publish.asuser import open_as
from tests.api_fixtures import Api
from tests.user_fixtures import People, User


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every user can search: pytest's own tmp directories sit under a 0700 parent."""
    root = Path(tempfile.mkdtemp(prefix="imagegw-import-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def squashfs(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    work = tmp_path_factory.mktemp("import-image")
    (work / "tree").mkdir()
    (work / "tree" / "hello").write_text("imported\n")
    subprocess.run(["mksquashfs", str(work / "tree"), str(work / "image.squashfs"), "-quiet", "-no-progress"],
                   check=True)
    return (work / "image.squashfs").read_bytes()


@pytest.fixture
def importing(api: Api, people: People) -> Api:
    platform = {"accesstype": "local", "local": {"imageDir": str(api.gateway.image_dir)},
                "mungeSocketPath": api.munged.socket_path, "admins": ["root"]}
    api.reconfigure(Platforms={"mycluster": platform},
                    ImportUsers=[people.caller.name, people.outsider.name])
    return api


def directory(path: Path, owner: User, mode: int, group: int | None = None) -> Path:
    path.mkdir()
    os.chown(path, owner.uid, owner.gid if group is None else group)
    path.chmod(mode)
    return path


def file(path: Path, data: bytes, owner: User, mode: int, group: int | None = None) -> Path:
    path.write_bytes(data)
    os.chown(path, owner.uid, owner.gid if group is None else group)
    path.chmod(mode)
    return path


def setfacl(path: Path, entry: str) -> None:
    subprocess.run(["setfacl", "-m", entry, str(path)], check=True)


def doimport(api: Api, user: User, path: Path, tag: str) -> Any:
    return api.call("POST", f"/api/doimport/mycluster/custom/{tag}/", uid=user.uid, gid=user.gid,
                    json={"filepath": str(path), "format": "squashfs"})


def assert_published(api: Api, response: Any, data: bytes) -> None:
    assert response.status_code == 200, response.text
    record = response.json()
    assert record["status"] == "READY"
    assert (api.gateway.image_dir / f"{record['id']}.squashfs").read_bytes() == data


def test_a_readable_file_in_another_users_private_directory_is_refused(
        importing: Api, people: People, shared: Path, squashfs: bytes) -> None:
    private = directory(shared / "private", people.owner, 0o700)
    image = file(private / "image.squashfs", squashfs, people.owner, 0o644)

    # The gateway used to look at the file's own mode only (0644) and published it: 200.
    refused = doimport(importing, people.caller, image, "private:1")

    assert refused.status_code == 403, refused.text
    assert refused.json()["error"] == f"uid {people.caller.uid} may not read {image}"


def test_an_acl_on_the_directory_lets_the_caller_through(
        importing: Api, people: People, shared: Path, squashfs: bytes) -> None:
    private = directory(shared / "private", people.owner, 0o700)
    image = file(private / "image.squashfs", squashfs, people.owner, 0o644)
    setfacl(private, f"u:{people.caller.name}:rx")

    assert_published(importing, doimport(importing, people.caller, image, "granted:1"), squashfs)
    assert doimport(importing, people.outsider, image, "granted:2").status_code == 403


def test_an_acl_on_the_file_grants_what_its_mode_does_not(
        importing: Api, people: People, shared: Path, squashfs: bytes) -> None:
    image = file(shared / "image.squashfs", squashfs, people.owner, 0o600)
    setfacl(image, f"u:{people.caller.name}:r")

    assert_published(importing, doimport(importing, people.caller, image, "acl:1"), squashfs)
    assert doimport(importing, people.outsider, image, "acl:2").status_code == 403


def test_an_acl_entry_denies_a_world_readable_file(
        importing: Api, people: People, shared: Path, squashfs: bytes) -> None:
    image = file(shared / "image.squashfs", squashfs, people.owner, 0o644)
    setfacl(image, f"u:{people.caller.name}:---")

    # The old check saw 0644 and published it.
    denied = doimport(importing, people.caller, image, "denied:1")

    assert denied.status_code == 403, denied.text
    assert doimport(importing, people.outsider, image, "denied:2").status_code == 200


def test_a_supplementary_group_opens_a_group_only_directory(
        importing: Api, people: People, shared: Path, squashfs: bytes) -> None:
    team = directory(shared / "team", people.owner, 0o750, group=people.team)
    image = file(team / "image.squashfs", squashfs, people.owner, 0o640, group=people.team)

    # The credential carries the caller's primary gid only: the team comes from the host's group database.
    assert_published(importing, doimport(importing, people.caller, image, "team:1"), squashfs)
    assert doimport(importing, people.outsider, image, "team:2").status_code == 403


def test_a_symlink_as_the_last_component_is_refused(
        importing: Api, people: People, shared: Path, squashfs: bytes) -> None:
    image = file(shared / "image.squashfs", squashfs, people.caller, 0o644)
    link = shared / "link.squashfs"
    link.symlink_to(image)

    refused = doimport(importing, people.caller, link, "link:1")

    assert refused.status_code == 400, refused.text
    assert refused.json()["error"].startswith(f"{link} is a symbolic link")


def test_a_fifo_is_refused_without_waiting_for_a_writer(importing: Api, people: People, shared: Path) -> None:
    fifo = shared / "image.squashfs"
    os.mkfifo(fifo, 0o666)
    responses: list[Any] = []

    caller = threading.Thread(target=lambda: responses.append(doimport(importing, people.caller, fifo, "fifo:1")),
                              daemon=True)
    caller.start()
    caller.join(30)

    assert responses, "doimport of a FIFO is still waiting for a writer"
    assert responses[0].status_code == 400 and responses[0].json()["error"] == f"{fifo} is not a regular file"


def test_a_file_that_is_not_squashfs_or_is_missing_is_a_bad_request(
        importing: Api, people: People, shared: Path) -> None:
    notes = file(shared / "notes.txt", b"hello", people.caller, 0o600)

    wrong = doimport(importing, people.caller, notes, "notes:1")
    missing = doimport(importing, people.caller, shared / "missing.squashfs", "missing:1")

    assert wrong.status_code == 400 and wrong.json()["error"] == f"{notes} is not a squashfs image"
    assert missing.status_code == 400
    assert missing.json()["error"] == f"cannot open {shared / 'missing.squashfs'}: No such file or directory"


def read_as(user: User, path: Path, groups: list[int] | None = None) -> bytes:
    with os.fdopen(open_as(str(path), user.uid, user.gid, [user.gid] if groups is None else groups), "rb") as f:
        assert not os.get_inheritable(f.fileno())
        return f.read()


def test_open_as_lets_the_kernel_decide(people: People, shared: Path) -> None:
    private = directory(shared / "private", people.owner, 0o700)
    secret = file(private / "secret", b"secret", people.owner, 0o644)

    assert read_as(people.owner, secret) == b"secret"
    with pytest.raises(PermissionError):
        read_as(people.caller, secret)
    setfacl(private, f"u:{people.caller.name}:x")
    assert read_as(people.caller, secret) == b"secret"
    with pytest.raises(OSError) as link:
        read_as(people.caller, _symlink(shared / "link", secret))
    assert link.value.errno == errno.ELOOP
    with pytest.raises(FileNotFoundError):
        read_as(people.caller, private / "missing")


def test_open_as_uses_the_groups_it_is_given(people: People, shared: Path) -> None:
    team = directory(shared / "team", people.owner, 0o750, group=people.team)
    notes = file(team / "notes", b"team", people.owner, 0o640, group=people.team)

    assert read_as(people.caller, notes, [people.caller.gid, people.team]) == b"team"
    with pytest.raises(PermissionError):
        read_as(people.caller, notes, [people.caller.gid])


def test_open_as_from_many_threads_at_once(people: People, shared: Path) -> None:
    # The API serves requests from a thread pool: each fork must hand back its own file, nothing crossed.
    paths = [file(shared / f"f{index}", str(index).encode(), people.owner, 0o600) for index in range(24)]
    read: dict[int, bytes] = {}

    def worker(index: int) -> None:
        read[index] = read_as(people.owner, paths[index])

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(len(paths))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert read == {index: str(index).encode() for index in range(len(paths))}


def test_a_gateway_not_running_as_root_opens_files_for_its_own_uid_only(people: People, shared: Path) -> None:
    mine = file(shared / "mine", b"mine", people.caller, 0o600)
    report, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(writer, _open_without_root(people, mine).encode())
        finally:
            os._exit(0)
    os.close(writer)
    os.waitpid(pid, 0)
    with os.fdopen(report) as outcome:
        assert outcome.read() == (f"mine; Forbidden: the gateway runs as uid {people.caller.uid}, not root, so it "
                                  f"cannot open files as uid {people.owner.uid}: doimport needs a gateway running "
                                  "as root")


def _open_without_root(people: People, path: Path) -> str:
    os.setgroups([])
    os.setgid(people.caller.gid)
    os.setuid(people.caller.uid)
    own = read_as(people.caller, path).decode()
    try:
        open_as(str(path), people.owner.uid, people.owner.gid, [])
    except Forbidden as refused:
        return f"{own}; Forbidden: {refused}"
    return f"{own}; opened as uid {people.owner.uid}"


def _symlink(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def test_an_open_that_hangs_is_given_up_naming_the_file(people: People, shared: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A file on a hung NFS server: the open never returns. Faked here (the child's os.open sleeps), since a
    hung filesystem cannot be made without one."""
    stuck = file(shared / "stuck", b"x", people.owner, 0o644)
    real_open = os.open

    def hanging_open(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path) == str(stuck):
            time.sleep(3600)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", hanging_open)
    monkeypatch.setattr(asuser, "OPEN_TIMEOUT", 1.0)
    began = time.monotonic()
    with pytest.raises(ServiceUnavailable, match=f"opening {stuck} as uid {people.caller.uid} took more than 1 s"):
        open_as(str(stuck), people.caller.uid, people.caller.gid, [people.caller.gid])
    assert time.monotonic() - began < 10
    monkeypatch.undo()
    assert read_as(people.owner, stuck) == b"x"  # the next open works: nothing was left holding anything
