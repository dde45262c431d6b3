"""Publishing into an image directory: final names only ever hold complete files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from imagegw.errors import StorageError
from imagegw.publish import LocalPublisher, render_meta


def test_publish_places_image_and_meta_and_leaves_no_temporaries(tmp_path: Path) -> None:
    built = tmp_path / "scratch" / "image.squashfs"
    built.parent.mkdir()
    built.write_bytes(b"hsqs" + b"\0" * 100)
    image_dir = tmp_path / "images"

    published = LocalPublisher(image_dir).publish(built, "FORMAT: squashfs\n", "ab" * 32)

    assert published.squashfs.read_bytes() == built.read_bytes()
    assert published.meta.read_text() == "FORMAT: squashfs\n"
    assert sorted(os.listdir(image_dir)) == [f"{'ab' * 32}.meta", f"{'ab' * 32}.squashfs"]
    assert stat.S_IMODE(published.squashfs.stat().st_mode) == 0o600
    assert LocalPublisher(image_dir).is_published("ab" * 32)


def test_republish_replaces_files_atomically(tmp_path: Path) -> None:
    image_dir = tmp_path / "images"
    for content in (b"first", b"second"):
        built = tmp_path / "built"
        built.write_bytes(content)
        LocalPublisher(image_dir).publish(built, "FORMAT: squashfs\n", "cd" * 32)

    assert (image_dir / f"{'cd' * 32}.squashfs").read_bytes() == b"second"


def test_unwritable_image_dir_is_a_storage_error_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    built = tmp_path / "built"
    built.write_bytes(b"x")

    with pytest.raises(StorageError, match=f"^{blocker}/images: Not a directory"):
        LocalPublisher(blocker / "images").publish(built, "FORMAT: squashfs\n", "ef" * 32)


def test_unpublish_removes_both_files(tmp_path: Path) -> None:
    built = tmp_path / "built"
    built.write_bytes(b"x")
    LocalPublisher(tmp_path / "images").publish(built, "FORMAT: squashfs\n", "01" * 32)

    LocalPublisher(tmp_path / "images").unpublish("01" * 32)

    assert os.listdir(tmp_path / "images") == []


def test_meta_lines_are_what_shifters_runtime_parses() -> None:
    text = render_meta(env=["PATH=/usr/bin", "X=1 2"], entry=["/bin/sh", "-c"], cmd=["echo hi"], workdir="/w",
                       user_acl=[1000, 0], group_acl=[4])

    assert text.splitlines() == [
        "FORMAT: squashfs", "ENTRY: ['/bin/sh', '-c']", "CMD: ['echo hi']", "WORKDIR: /w",
        "USERACL: 1000,0", "GROUPACL: 4", "ENV: PATH=/usr/bin", "ENV: X=1 2",
    ]


def test_meta_without_entrypoint_or_acl_has_only_what_exists() -> None:
    assert render_meta(env=[], entry=None, cmd=None, workdir=None) == "FORMAT: squashfs\n"
