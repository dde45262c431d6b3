"""Layer flattening: OCI whiteout semantics and hostile layers, checked on the final tree."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from imagegw.build.flatten import ImageTree, LayerSource, flatten_layers
from imagegw.errors import LayerError, UnsafeLayerEntry
from tests.layer_fixtures import Layers, d, f, hard, member, sym


def flatten(*layers: LayerSource) -> tuple[dict[str, tuple], list[str]]:
    warnings: list[str] = []
    tree = flatten_layers(layers, warnings.append)
    return tree.paths(), warnings


def tar_of(tree: ImageTree, tmp_path: Path) -> tarfile.TarFile:
    out = tmp_path / "image.tar"
    with out.open("wb") as stream:
        tree.write_tar(stream)
    return tarfile.open(out)


def content(archive: tarfile.TarFile, name: str) -> bytes:
    data = archive.extractfile(name)
    assert data is not None, f"{name} is not a regular file"
    return data.read()


def test_single_layer(layer: Layers) -> None:
    paths, warnings = flatten(layer(
        d("etc"), f("etc/hosts", b"127.0.0.1\n"), sym("lib64", "lib"), member("run/fifo", tarfile.FIFOTYPE),
        f("./usr/bin/tool", b"#!", mode=0o755),
    ))
    assert paths == {
        "etc": ("dir", 0o755, None),
        "etc/hosts": ("file", 0o644, 10),
        "lib64": ("symlink", 0o777, "lib"),
        "run": ("dir", 0o755, None),
        "run/fifo": ("fifo", 0o644, None),
        "usr": ("dir", 0o755, None),
        "usr/bin": ("dir", 0o755, None),
        "usr/bin/tool": ("file", 0o755, 2),
    }
    assert warnings == []


def test_whiteout_removes_lower_file_and_directory(layer: Layers) -> None:
    base = layer(f("keep"), f("gone"), d("dir"), f("dir/a"), d("dir/sub"), f("dir/sub/b"))
    paths, _ = flatten(base, layer(f(".wh.gone"), f(".wh.dir"), f(".wh.never-existed"), f("nowhere/.wh.x")))
    assert paths == {"keep": ("file", 0o644, 0)}


def test_whiteout_of_same_layer_entry_has_no_effect(layer: Layers) -> None:
    base = layer(f("old", b"lower"))
    top = layer(f("new", b"x"), f(".wh.new"), f("old", b"upper"), f(".wh.old"))
    paths, _ = flatten(base, top)
    assert paths == {"new": ("file", 0o644, 1), "old": ("file", 0o644, 5)}


def test_whiteout_of_symlink_removes_the_link_only(layer: Layers) -> None:
    base = layer(d("data"), f("data/file"), sym("link", "/data"), sym("up", "../data"))
    paths, _ = flatten(base, layer(f(".wh.link"), f(".wh.up")))
    assert paths == {"data": ("dir", 0o755, None), "data/file": ("file", 0o644, 0)}


def test_whiteout_through_symlinked_parent(layer: Layers) -> None:
    base = layer(d("real"), f("real/x"), f("real/y"), sym("alias", "real"))
    paths, _ = flatten(base, layer(f("alias/.wh.x")))
    assert "real/x" not in paths and "real/y" in paths


@pytest.mark.parametrize("name", [".wh.", "dir/.wh..", "dir/.wh..."])
def test_invalid_whiteout_raises(layer: Layers, name: str) -> None:
    with pytest.raises(UnsafeLayerEntry, match="invalid whiteout") as error:
        flatten(layer(d("dir"), f(name)))
    assert "sha256:" + "0" * 63 + "1" in str(error.value)


def test_aufs_meta_entries_are_ignored(layer: Layers) -> None:
    paths, warnings = flatten(layer(
        f("a"), d(".wh..wh.plnk"), f(".wh..wh.plnk/123.456"), f(".wh..wh.aufs"), d("dir"), f("dir/.wh..wh.orph"),
    ))
    assert paths == {"a": ("file", 0o644, 0), "dir": ("dir", 0o755, None)}
    assert warnings == []


def test_opaque_directory_hides_lower_children_only(layer: Layers) -> None:
    base = layer(d("opq"), f("opq/lower"), d("opq/sub"), f("opq/sub/lower-grandchild"), d("opq/gone"),
                 f("opq/gone/x"), f("outside"))
    # The marker comes after this layer's own children, yet applies first: they stay,
    # and so does the same-layer subdirectory, minus what lower layers put in it.
    top = layer(d("opq", 0o750), f("opq/new", b"n"), d("opq/sub"), f("opq/sub/new-grandchild"),
                f("opq/.wh..wh..opq"), f("opq/after"))
    paths, _ = flatten(base, top)
    assert paths == {
        "opq": ("dir", 0o755, None),
        "opq/after": ("file", 0o644, 0),
        "opq/new": ("file", 0o644, 1),
        "opq/sub": ("dir", 0o755, None),
        "opq/sub/new-grandchild": ("file", 0o644, 0),
        "outside": ("file", 0o644, 0),
    }


def test_opaque_marker_keeps_implicit_parents_of_same_layer_entries(layer: Layers) -> None:
    base = layer(d("opq"), d("opq/sub"), f("opq/sub/old"), f("opq/old"))
    paths, _ = flatten(base, layer(f("opq/sub/new"), f("opq/.wh..wh..opq")))
    assert paths == {"opq": ("dir", 0o755, None), "opq/sub": ("dir", 0o755, None),
                     "opq/sub/new": ("file", 0o644, 0)}


def test_opaque_root(layer: Layers) -> None:
    paths, _ = flatten(layer(f("a"), d("b"), f("b/c")), layer(f("z"), f(".wh..wh..opq")))
    assert paths == {"z": ("file", 0o644, 0)}


def test_directory_replaced_by_file_and_file_by_directory(layer: Layers) -> None:
    base = layer(d("was-dir"), f("was-dir/child"), d("was-dir/sub"), f("was-file", b"abc"))
    top = layer(f("was-dir", b"now a file"), d("was-file"), f("was-file/child"))
    paths, _ = flatten(base, top)
    assert paths == {
        "was-dir": ("file", 0o644, 10),
        "was-file": ("dir", 0o755, None),
        "was-file/child": ("file", 0o644, 0),
    }


def test_directory_over_directory_keeps_children_and_takes_new_mode(layer: Layers) -> None:
    paths, _ = flatten(layer(d("dir", 0o700), f("dir/a")), layer(d("dir", 0o1777), f("dir/b")))
    assert paths == {"dir": ("dir", 0o1777, None), "dir/a": ("file", 0o644, 0), "dir/b": ("file", 0o644, 0)}


def test_duplicate_entries_later_wins(layer: Layers) -> None:
    paths, _ = flatten(layer(f("x", b"first"), sym("x", "elsewhere"), f("y"), f("y", b"second")))
    assert paths == {"x": ("symlink", 0o777, "elsewhere"), "y": ("file", 0o644, 6)}


def test_hard_links_share_data_and_survive_replacement(layer: Layers, tmp_path: Path) -> None:
    base = layer(d("bin"), f("bin/orig", b"original", mode=0o755), hard("bin/same-layer", "bin/orig"),
                 sym("bin/sl", "orig"))
    mid = layer(hard("lower-link", "/bin/orig"), hard("link-to-symlink", "bin/sl"))
    top = layer(f("bin/orig", b"replaced"))
    tree = flatten_layers([base, mid, top])
    assert tree.paths()["lower-link"] == ("file", 0o755, 8)
    assert tree.paths()["link-to-symlink"] == ("symlink", 0o777, "orig")
    assert tree.file_bytes == 16  # the shared "original" counts once
    archive = tar_of(tree, tmp_path)
    members = {info.name: info for info in archive.getmembers()}
    assert members["bin/same-layer"].isreg()  # the first path of the group carries the data
    assert members["lower-link"].islnk() and members["lower-link"].linkname == "bin/same-layer"
    assert content(archive, "lower-link") == b"original"
    assert content(archive, "bin/orig") == b"replaced"


def test_hard_link_through_symlinked_parent(layer: Layers) -> None:
    paths, _ = flatten(layer(d("real"), f("real/file", b"x"), sym("alias", "/real"), hard("hl", "alias/file")))
    assert paths["hl"] == ("file", 0o644, 1)


@pytest.mark.parametrize(("target", "problem"), [("missing", "does not exist"), ("dir", "is a directory"),
                                                 ("dir/nothing/here", "does not exist"), (".", "is a directory")])
def test_bad_hard_link_target_raises(layer: Layers, target: str, problem: str) -> None:
    with pytest.raises(UnsafeLayerEntry, match=problem) as error:
        flatten(layer(d("dir"), hard("hl", target)))
    assert "sha256:" in str(error.value) and "'hl'" in str(error.value) and target in str(error.value)


def test_hard_link_target_cannot_leave_the_root(layer: Layers) -> None:
    # The link names "/etc/shadow" of the host; inside the model that is the image's own file.
    paths, warnings = flatten(layer(d("etc"), f("etc/shadow", b"image"), hard("a/b/hl", "../../../../etc/shadow"),
                                    f("a/b/hl", b"new content")))
    assert paths["etc/shadow"] == ("file", 0o644, 5)
    assert paths["a/b/hl"] == ("file", 0o644, 11)
    assert len(warnings) == 1 and "climbs above" in warnings[0]


def test_absolute_symlinks_are_kept_verbatim(layer: Layers) -> None:
    paths, _ = flatten(layer(sym("bin", "/usr/bin"), sym("escape", "../../../../etc/shadow")))
    assert paths == {"bin": ("symlink", 0o777, "/usr/bin"), "escape": ("symlink", 0o777, "../../../../etc/shadow")}


def test_names_are_clamped_inside_the_root(layer: Layers) -> None:
    paths, warnings = flatten(layer(
        f("../x", b"1"), f("/abs/file", b"2"), f("./../y", b"3"), f("a/../../z", b"4"),
        member("harmless", data=b"5", pax={"path": "../pax"}),
    ))
    assert paths == {
        "abs": ("dir", 0o755, None),
        "abs/file": ("file", 0o644, 1),
        "pax": ("file", 0o644, 1),
        "x": ("file", 0o644, 1),
        "y": ("file", 0o644, 1),
        "z": ("file", 0o644, 1),
    }
    assert len(warnings) == 4
    assert all("sha256:" in warning and "climbs above the image root" in warning for warning in warnings)
    assert any("'../pax'" in warning for warning in warnings)


def test_root_entries(layer: Layers, tmp_path: Path) -> None:
    paths, warnings = flatten(layer(d("./", 0o700), sym(".", "/host"), f("a")))
    assert paths == {"a": ("file", 0o644, 0)}
    assert len(warnings) == 1 and "root" in warnings[0]
    tree = flatten_layers([layer(d(".", 0o750))])
    root = tar_of(tree, tmp_path).getmembers()[0]
    assert (root.name, root.isdir(), root.mode) == (".", True, 0o755)


@pytest.mark.parametrize("same_layer", [True, False])
def test_symlinked_parent_is_followed_inside_the_root(layer: Layers, same_layer: bool) -> None:
    link, entry = sym("etc", "/host"), f("etc/passwd", b"root:x:0:0")
    layers = [layer(link, entry)] if same_layer else [layer(link), layer(entry)]
    paths, _ = flatten(*layers)
    assert paths == {
        "etc": ("symlink", 0o777, "/host"),
        "host": ("dir", 0o755, None),
        "host/passwd": ("file", 0o644, 10),
    }


def test_relative_symlink_climbing_out_lands_at_root(layer: Layers) -> None:
    paths, _ = flatten(layer(sym("up", "../.."), f("up/x")), layer(d("a"), sym("a/b", "../.."),
                                                                   f("a/b/ESCAPED_VIA_SYMLINK")))
    assert paths == {
        "ESCAPED_VIA_SYMLINK": ("file", 0o644, 0),
        "a": ("dir", 0o755, None),
        "a/b": ("symlink", 0o777, "../.."),
        "up": ("symlink", 0o777, "../.."),
        "x": ("file", 0o644, 0),
    }


def test_symlink_chain(layer: Layers) -> None:
    paths, _ = flatten(layer(sym("a", "b"), sym("b", "../.."), f("a/x"), d("c"), sym("c/d", "../a"),
                             f("c/d/y")))
    assert {path for path, entry in paths.items() if entry[0] == "file"} == {"x", "y"}


@pytest.mark.parametrize("links", [[("loop", "loop")], [("a", "b"), ("b", "/a")], [("self", ".")]])
def test_symlink_loop_raises(layer: Layers, links: list[tuple[str, str]]) -> None:
    members = [sym(name, target) for name, target in links]
    entry = links[0][0] + "/x" if links[0][1] != "." else "/".join(["self"] * 45) + "/x"
    with pytest.raises(UnsafeLayerEntry, match="too many levels of symbolic links"):
        flatten(layer(*members, f(entry)))


def test_file_as_parent_raises(layer: Layers) -> None:
    with pytest.raises(UnsafeLayerEntry, match="parent 'etc/passwd' is not a directory") as error:
        flatten(layer(d("etc"), f("etc/passwd")), layer(f("etc/passwd/x")))
    assert "sha256:" + "0" * 63 + "2" in str(error.value)


def test_devices_dropped_fifo_kept(layer: Layers) -> None:
    paths, warnings = flatten(layer(
        d("dev"), member("dev/null", tarfile.CHRTYPE), member("dev/sda", tarfile.BLKTYPE),
        member("dev/fifo", tarfile.FIFOTYPE, mode=0o600), member("dev/weird", b"Z"),
    ))
    assert paths == {"dev": ("dir", 0o755, None), "dev/fifo": ("fifo", 0o644, None)}
    assert len(warnings) == 3 and all("dropped" in warning and "sha256:" in warning for warning in warnings)


def test_modes_are_normalised(layer: Layers, tmp_path: Path) -> None:
    tree = flatten_layers([layer(
        f("suid", mode=0o4755), f("sgid", mode=0o2710), f("private", mode=0o600), f("userexec", mode=0o700),
        d("sticky", mode=0o1777), d("closed", mode=0o000), d("setgid-dir", mode=0o2700), f("none", mode=0),
    )])
    assert {path: mode for path, (_, mode, _) in tree.paths().items()} == {
        "suid": 0o755, "sgid": 0o755, "private": 0o644, "userexec": 0o755,
        "sticky": 0o1777, "closed": 0o555, "setgid-dir": 0o755, "none": 0o444,
    }
    for info in tar_of(tree, tmp_path):
        assert (info.uid, info.gid, info.uname, info.gname) == (0, 0, "", "")


def test_write_tar_is_ordered_and_complete(layer: Layers, tmp_path: Path) -> None:
    long_name = "deep/" + "n" * 150
    tree = flatten_layers([
        layer(f("z/last", b"zz"), d("a"), f("b", b"bee"), f("a/c", b"x" * 100_000), f(long_name, b"long"),
              f("bad\udcffname", b"raw")),
        layer(f("a/b", b"ab")),
    ])
    archive = tar_of(tree, tmp_path)
    names = archive.getnames()
    assert names == [".", "a", "a/b", "a/c", "b", "bad\udcffname", "deep", long_name, "z", "z/last"]
    assert content(archive, "a/c") == b"x" * 100_000
    assert content(archive, long_name) == b"long"
    assert content(archive, "bad\udcffname") == b"raw"
    assert tree.entries == 9 and tree.file_bytes == 100_000 + 2 + 3 + 4 + 3 + 2
    data = (tmp_path / "image.tar").read_bytes()
    assert len(data) % 512 == 0 and data[-1024:] == bytes(1024)


def test_write_tar_to_pipe(layer: Layers) -> None:
    big = bytes(range(256)) * 4096 * 4  # 4 MiB: more than a pipe holds, and sent with sendfile
    tree = flatten_layers([layer(f("big", big), f("small", b"s"))])
    reader = subprocess.Popen(["tar", "-tvf", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert reader.stdin is not None
    tree.write_tar(reader.stdin)
    reader.stdin.close()
    listing = reader.stdout.read().decode() if reader.stdout else ""
    assert reader.wait() == 0
    assert " big" in listing and str(len(big)) in listing and " small" in listing


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar writes the sparse layer")
def test_sparse_member(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    with (source / "sparse").open("wb") as sparse:
        sparse.seek(1 << 20)
        sparse.write(b"data")
        sparse.seek(3 << 20)
        sparse.write(b"end")
    layer_path = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "--format=pax", "-cf", str(layer_path), "-C", str(source), "sparse"],
                   check=True)
    tree = flatten_layers([LayerSource(layer_path, "sha256:sparse")])
    assert tree.paths()["sparse"][2] == (3 << 20) + 3
    expanded = bytes(1 << 20) + b"data" + bytes((2 << 20) - 4) + b"end"
    assert content(tar_of(tree, tmp_path), "sparse") == expanded


def test_corrupt_tars_raise_layer_error(layer: Layers, tmp_path: Path) -> None:
    good = layer(f("a", b"x" * 2000), f("b", b"y" * 2000), f("c"))
    data = good.path.read_bytes()
    cases = {
        "garbage": b"this is not a tar archive at all" * 40,
        "truncated": data[:1536],
        "bad-header": data[:2560] + b"\x01" * 512 + data[3072:],
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.tar"
        path.write_bytes(content)
        with pytest.raises(LayerError, match=f"layer sha256:{name}: unreadable tar"):
            flatten_layers([LayerSource(path, f"sha256:{name}")])
    with pytest.raises(LayerError, match="sha256:missing"):
        flatten_layers([LayerSource(tmp_path / "absent.tar", "sha256:missing")])


def test_write_tar_without_sendfile(layer: Layers, tmp_path: Path) -> None:
    # sendfile refuses an O_APPEND output; the copy must still be complete.
    big = bytes(range(256)) * 1024
    tree = flatten_layers([layer(f("big", big), f("next", b"n" * 70_000))])
    out = tmp_path / "appended.tar"
    with out.open("ab") as stream:
        tree.write_tar(stream)
    with tarfile.open(out) as archive:
        assert content(archive, "big") == big
        assert content(archive, "next") == b"n" * 70_000


def test_layer_shrunk_after_flattening_raises(layer: Layers, tmp_path: Path) -> None:
    source = layer(f("big", b"b" * 200_000))
    tree = flatten_layers([source])
    with source.path.open("r+b") as shrink:
        shrink.truncate(100_000)
    with (tmp_path / "out.tar").open("wb") as stream, pytest.raises(LayerError, match="'big'.*ends inside"):
        tree.write_tar(stream)


def test_closed_directory_still_takes_later_entries(layer: Layers) -> None:
    paths, _ = flatten(layer(d("locked", 0o000)), layer(f("locked/inside", b"x")))
    assert paths == {"locked": ("dir", 0o555, None), "locked/inside": ("file", 0o644, 1)}


def test_extended_attributes_are_dropped(layer: Layers, tmp_path: Path) -> None:
    tree = flatten_layers([layer(member("ping", data=b"elf", mode=0o755, pax={
        "SCHILY.xattr.security.capability": "cap_net_raw+ep", "SCHILY.xattr.trusted.overlay.opaque": "y",
    }))])
    info = tar_of(tree, tmp_path).getmember("ping")
    assert not any("xattr" in key for key in info.pax_headers)


@pytest.mark.parametrize("name", [
    "n" * 100,                      # fills the ustar name field
    "d" * 60 + "/" + "n" * 100,     # needs the ustar prefix field
    "d" * 155 + "/" + "n" * 100,    # the longest split ustar holds
    "d" * 156 + "/" + "n" * 10,     # prefix too long: PAX
    "x/" + "n" * 101,               # last component too long: PAX
    "caf\u00e9/men\u00fc",          # non-ASCII: PAX
])
def test_headers_round_trip_whatever_their_encoding(layer: Layers, tmp_path: Path, name: str) -> None:
    link_target = "t" * 100
    tree = flatten_layers([layer(f(name, b"data", mode=0o750), sym(name + ".lnk", link_target),
                                 hard(name + ".hl", name))])

    archive = tar_of(tree, tmp_path)

    entry = archive.getmember(name)
    assert (entry.isreg(), entry.mode, entry.size, entry.uid, entry.gid) == (True, 0o755, 4, 0, 0)  # a+rX
    assert content(archive, name) == b"data"
    assert archive.getmember(name + ".lnk").linkname == link_target
    assert archive.getmember(name + ".hl").islnk() and archive.getmember(name + ".hl").linkname == name


def test_prepared_layers_are_flattened_from_their_member_files(layer: Layers) -> None:
    from imagegw.build.flatten import prepare_layer

    source = layer(d("etc"), f("etc/a", b"a"), sym("lib", "usr/lib"))
    expected, _ = flatten(source)
    prepare_layer(source)
    members_file = source.path.with_name(source.path.name + ".members")
    assert members_file.is_file()
    # Headers come from the member file now: damage them in the tar and nothing changes.
    data = bytearray(source.path.read_bytes())
    data[:512] = bytes(512)
    source.path.write_bytes(bytes(data))

    assert flatten(source)[0] == expected


def test_a_damaged_member_file_is_ignored(layer: Layers) -> None:
    from imagegw.build.flatten import prepare_layer

    source = layer(f("x", b"x"))
    prepare_layer(source)
    source.path.with_name(source.path.name + ".members").write_bytes(b"garbage")

    assert flatten(source)[0] == {"x": ("file", 0o644, 1)}


def test_prepare_finds_a_corrupt_layer(layer: Layers) -> None:
    from imagegw.build.flatten import prepare_layer

    source = layer(f("x", b"x" * 2000), f("y", b"y"))
    source.path.write_bytes(source.path.read_bytes()[:1536])  # cut inside the first file's data

    with pytest.raises(LayerError, match=source.digest):
        prepare_layer(source)
