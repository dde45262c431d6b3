"""The pull pipeline end to end: real registry, real Prefect API, real SecantusDB, real squashfs tools."""

from __future__ import annotations

import os
import re
import shutil
import stat
import time

import pytest

from imagegw.access import Access
from imagegw.store import PullKey
from tests.gateway_fixtures import Gateway, pull
from tests.squashfs_reader import read_tree
from testsupport.images import LayerBuilder, push_image, push_index


def published_files(gateway: Gateway) -> list[str]:
    return sorted(path.name for path in gateway.image_dir.iterdir()) if gateway.image_dir.exists() else []


def test_single_layer_image_becomes_a_ready_squashfs_with_meta(gateway: Gateway) -> None:
    layer = LayerBuilder().dir("etc").file("etc/hello.txt", b"hello\n").file("bin/run", b"#!/bin/sh\n", 0o755)
    built = push_image(gateway.registry, "test/single", "1.0", [layer], env=["PATH=/bin", "A=b c"],
                       entrypoint=["/bin/run"], cmd=["--now"], workdir="/work")

    state, record = pull(gateway, gateway.image("test/single:1.0"))

    assert state.is_completed(), state.message
    image_id = built.manifest_digest.removeprefix("sha256:")
    assert record["status"] == "READY" and record["id"] == image_id
    ready = gateway.store().lookup(PullKey("mycluster", "docker", gateway.image("test/single:1.0")))
    assert ready["tag"] == [gateway.image("test/single:1.0")]
    assert ready["ENV"] == ["PATH=/bin", "A=b c"] and ready["ENTRY"] == ["/bin/run"]
    assert ready["WORKDIR"] == "/work" and ready["expiration"] > ready["last_pull"]
    assert published_files(gateway) == [f"{image_id}.meta", f"{image_id}.squashfs"]
    tree = read_tree(gateway.image_dir / f"{image_id}.squashfs")
    assert tree["etc/hello.txt"].data == b"hello\n"
    assert tree["bin/run"].mode == 0o755 and tree["bin"].kind == "dir"
    assert all(entry.uid == 0 and entry.gid == 0 for entry in tree.values())
    meta = (gateway.image_dir / f"{image_id}.meta").read_text().splitlines()
    assert meta[0] == "FORMAT: squashfs"
    assert "ENTRY: ['/bin/run']" in meta and "CMD: ['--now']" in meta and "WORKDIR: /work" in meta
    assert "ENV: A=b c" in meta
    assert stat.S_IMODE((gateway.image_dir / f"{image_id}.squashfs").stat().st_mode) == 0o600


def test_layers_apply_whiteouts_opaque_dirs_replacements_and_links(gateway: Gateway) -> None:
    base = (LayerBuilder()
            .dir("etc").file("etc/keep", b"keep").file("etc/gone", b"gone")
            .dir("opt").dir("opt/app").file("opt/app/old1", b"1").dir("opt/app/sub").file("opt/app/sub/old2", b"2")
            .dir("data").file("data/inside", b"x")
            .file("conf", b"file first")
            .file("usr/lib/libfoo.so.1", b"ELF", 0o755)
            .file("bin/su", b"su", 0o4755))
    upper = (LayerBuilder()
             .whiteout("etc/gone")
             .dir("opt/app").file("opt/app/new", b"new").opaque("opt/app")
             .file("data", b"data is now a file")
             .dir("conf").file("conf/inner", b"conf is now a dir")
             .hardlink("usr/lib/libfoo.so", "usr/lib/libfoo.so.1")
             .symlink("bin/sh", "/usr/bin/bash").symlink("lib", "usr/lib"))
    built = push_image(gateway.registry, "test/layers", "1", [base, upper])

    state, record = pull(gateway, gateway.image("test/layers:1"))

    assert state.is_completed(), record["status_message"]
    tree = read_tree(gateway.image_dir / f"{built.manifest_digest.removeprefix('sha256:')}.squashfs")
    assert "etc/gone" not in tree and tree["etc/keep"].data == b"keep"
    assert {name for name in tree if name.startswith("opt/app/")} == {"opt/app/new"}
    assert tree["data"].kind == "file" and tree["data"].data == b"data is now a file"
    assert "data/inside" not in tree
    assert tree["conf"].kind == "dir" and tree["conf/inner"].data == b"conf is now a dir"
    link_pair = {tree["usr/lib/libfoo.so"].kind, tree["usr/lib/libfoo.so.1"].kind}
    assert link_pair == {"file", "hardlink"}
    assert tree["bin/sh"].kind == "symlink" and tree["bin/sh"].target == "/usr/bin/bash"
    assert tree["lib"].target == "usr/lib"
    assert tree["bin/su"].mode == 0o755  # setuid stripped
    assert not any(".wh." in name for name in tree)


def test_multi_arch_index_gives_each_platform_its_own_image(gateway: Gateway) -> None:
    amd = push_image(gateway.registry, "test/multi", None, [LayerBuilder().file("arch", b"amd64")])
    arm = push_image(gateway.registry, "test/multi", None, [LayerBuilder().file("arch", b"arm64")],
                     architecture="arm64", variant="v8")
    push_index(gateway.registry, "test/multi", "1", [amd, arm])

    amd_state, amd_record = pull(gateway, gateway.image("test/multi:1"), "mycluster")
    arm_state, arm_record = pull(gateway, gateway.image("test/multi:1"), "armcluster")

    assert amd_state.is_completed() and arm_state.is_completed()
    assert amd_record["id"] == amd.manifest_digest.removeprefix("sha256:")
    assert arm_record["id"] == arm.manifest_digest.removeprefix("sha256:")
    arm_tree = read_tree(gateway.root / "arm-images" / f"{arm_record['id']}.squashfs")
    assert arm_tree["arch"].data == b"arm64"


def test_index_without_the_platform_fails_listing_what_it_offers(gateway: Gateway) -> None:
    amd = push_image(gateway.registry, "test/amdonly", None, [LayerBuilder().file("a", b"a")])
    push_index(gateway.registry, "test/amdonly", "1", [amd])

    state, record = pull(gateway, gateway.image("test/amdonly:1"), "armcluster")

    assert state.is_failed()
    assert record["status"] == "FAILURE"
    assert "arm64" in record["status_message"] and "linux/amd64" in record["status_message"]


@pytest.mark.parametrize("media, compression", [("oci", "zstd"), ("docker", "gzip"), ("oci", "none")])
def test_layer_formats(gateway: Gateway, media: str, compression: str) -> None:
    layers = [LayerBuilder().file("a.txt", b"A" * 10000), LayerBuilder().file("b.txt", b"B")]
    built = push_image(gateway.registry, f"test/{media}-{compression}", "1", layers,
                       media=media, compression=compression)

    state, record = pull(gateway, gateway.image(f"test/{media}-{compression}:1"))

    assert state.is_completed(), record["status_message"]
    tree = read_tree(gateway.image_dir / f"{built.manifest_digest.removeprefix('sha256:')}.squashfs")
    assert tree["a.txt"].data == b"A" * 10000 and tree["b.txt"].data == b"B"


def test_pull_by_digest(gateway: Gateway) -> None:
    built = push_image(gateway.registry, "test/bydigest", "1", [LayerBuilder().file("x", b"x")])

    state, record = pull(gateway, gateway.image(f"test/bydigest@{built.manifest_digest}"))

    assert state.is_completed(), record["status_message"]
    assert record["id"] == built.manifest_digest.removeprefix("sha256:")


def test_second_tag_of_the_same_digest_joins_the_record(gateway: Gateway) -> None:
    layers = [LayerBuilder().file("same", b"same")]
    built = push_image(gateway.registry, "test/tags", "1", layers)
    push_image(gateway.registry, "test/tags", "stable", layers)

    pull(gateway, gateway.image("test/tags:1"))
    pull(gateway, gateway.image("test/tags:stable"))

    records = gateway.store().list_images("mycluster")
    assert len(records) == 1
    assert records[0]["id"] == built.manifest_digest.removeprefix("sha256:")
    assert sorted(records[0]["tag"]) == [gateway.image("test/tags:1"), gateway.image("test/tags:stable")]


def test_repull_of_an_unchanged_digest_downloads_and_converts_nothing(gateway: Gateway) -> None:
    push_image(gateway.registry, "test/again", "1", [LayerBuilder().file("f", b"f" * 5000)])
    pull(gateway, gateway.image("test/again:1"))
    shutil.rmtree(gateway.cache_dir)
    squashfs = next(gateway.image_dir.glob("*.squashfs"))
    before = squashfs.stat().st_mtime_ns

    state, record = pull(gateway, gateway.image("test/again:1"))

    assert state.is_completed() and record["status"] == "READY"
    assert not gateway.cache_dir.exists() or not any(gateway.cache_dir.rglob("*.tar"))
    assert squashfs.stat().st_mtime_ns == before


def test_tag_moved_to_a_new_digest_leaves_the_old_image(gateway: Gateway) -> None:
    old = push_image(gateway.registry, "test/moving", "1", [LayerBuilder().file("v", b"1")])
    pull(gateway, gateway.image("test/moving:1"))
    new = push_image(gateway.registry, "test/moving", "1", [LayerBuilder().file("v", b"2")])

    pull(gateway, gateway.image("test/moving:1"))

    found = gateway.store().lookup(PullKey("mycluster", "docker", gateway.image("test/moving:1")))
    assert found["id"] == new.manifest_digest.removeprefix("sha256:")
    old_record = gateway.store().ready_image("mycluster", old.manifest_digest.removeprefix("sha256:"))
    assert old_record["tag"] == []


@pytest.mark.parametrize("name, message", [
    ("test/single-missing:nope", "repository unknown"),
])
def test_unknown_repository_fails_with_a_clear_message(gateway: Gateway, name: str, message: str) -> None:
    state, record = pull(gateway, gateway.image(name))

    assert state.is_failed()
    assert record["status"] == "FAILURE" and message in record["status_message"]
    assert gateway.image("test/single-missing") in record["status_message"]
    assert published_files(gateway) == []


def test_unknown_tag_fails_with_a_clear_message(gateway: Gateway) -> None:
    push_image(gateway.registry, "test/hastag", "1", [LayerBuilder().file("x", b"x")])

    state, record = pull(gateway, gateway.image("test/hastag:2"))

    assert state.is_failed()
    assert record["status_message"].startswith("manifest unknown")
    assert gateway.image("test/hastag:2") in record["status_message"]
    assert published_files(gateway) == []


def test_corrupted_blob_fails_and_leaves_no_bad_layer_in_the_cache(gateway: Gateway) -> None:
    built = push_image(gateway.registry, "test/corrupt", "1", [LayerBuilder().file("x", b"x" * 4096)])
    blob = gateway.registry.blob_path(built.layer_digests[0])
    blob.write_bytes(blob.read_bytes()[:-8] + b"garbage!")

    state, record = pull(gateway, gateway.image("test/corrupt:1"))

    assert state.is_failed()
    assert "digest" in record["status_message"] and built.layer_digests[0] in record["status_message"]
    assert published_files(gateway) == []
    assert not any(path.is_file() and path.suffix == ".tar" for path in gateway.cache_dir.rglob("*"))
    assert not any(".partial" in path.name for path in gateway.cache_dir.rglob("*"))


def test_registry_down_fails_after_retries_with_a_clear_message(gateway: Gateway, tmp_path) -> None:
    from testsupport.registry import RunningRegistry

    down = RunningRegistry.start(tmp_path / "down-registry")
    host = down.host
    down.stop()
    gateway.write_config(Locations={host: {"url": f"http://{host}"}})

    state, record = pull(gateway, f"{host}/test/x:1")

    assert state.is_failed()
    assert "unreachable" in record["status_message"] and host in record["status_message"]
    assert published_files(gateway) == []


def test_a_full_image_directory_fails_the_pull_at_once_naming_it(gateway: Gateway, small_disk) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    # maxImageBytes set: by default (the disk's free space) the image would be refused before it is built.
    gateway.write_config(Platforms={"mycluster": {"accesstype": "local", "local": {"imageDir": str(small_disk)}}},
                         Limits={"maxImageBytes": "1G"})
    push_image(gateway.registry, "test/big", "1", [LayerBuilder().file("small", b"the tag's image so far")])
    assert pull(gateway, gateway.image("test/big:1"))[0].is_completed()
    served = os.listdir(small_disk)
    push_image(gateway.registry, "test/big", "1", [LayerBuilder().file("noise", os.urandom(1 << 20))])

    state, record = pull(gateway, gateway.image("test/big:1"))

    assert state.is_failed()
    assert record["status"] == "FAILURE"
    assert record["status_message"].startswith(f"{small_disk}: No space left on device (publishing image ")
    assert sorted(os.listdir(small_disk)) == sorted(served)  # no partial file under any name
    still = gateway.store().lookup(PullKey("mycluster", "docker", gateway.image("test/big:1")))
    assert still is not None and f"{still['id']}.squashfs" in served, "the tag's previous image is still served"
    this_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    deadline = time.monotonic() + 20  # the server records task runs from events, a moment later
    with get_client(sync_client=True) as client:
        while True:
            transfers = [run for run in client.read_task_runs(flow_run_filter=this_run)
                         if run.name.startswith("transfer") and run.state_type and run.state_type.value == "FAILED"]
            if transfers or time.monotonic() > deadline:
                break
            time.sleep(0.3)
    assert [run.run_count for run in transfers] == [1]  # a full disk is not retried


def test_a_private_pull_run_again_without_its_login_fails_at_once(gateway: Gateway) -> None:
    push_image(gateway.registry, "test/private", "1", [LayerBuilder().file("x", b"x")])
    image = gateway.image("test/private:1")
    # A private request whose one-time login a first run has taken: as a re-run from the Prefect UI finds it.
    gateway.store().claim_pull(PullKey("mycluster", "docker", image), Access(True, (1000,), (1000,)))

    state, record = pull(gateway, image)

    assert state.is_failed()
    assert record["status"] == "FAILURE"
    assert "must pull it again with their login" in record["status_message"]
    assert published_files(gateway) == []


def test_hostile_entries_stay_inside_the_image(gateway: Gateway) -> None:
    import tarfile

    escape = tarfile.TarInfo("../../escaped-by-name")
    escape.size = 3
    layers = [
        LayerBuilder().symlink("etc", "/host").raw(escape, b"bad").file("etc/passwd", b"root:x:0:0\n")
        .chardev("dev/mem").file("secret", b"s", 0o600).dir("private", 0o700),
        LayerBuilder().symlink("up", "../..").file("up/escaped-by-link", b"bad"),
    ]
    built = push_image(gateway.registry, "test/hostile", "1", layers)

    state, record = pull(gateway, gateway.image("test/hostile:1"))

    assert state.is_completed(), record["status_message"]
    tree = read_tree(gateway.image_dir / f"{built.manifest_digest.removeprefix('sha256:')}.squashfs")
    assert tree["host/passwd"].data == b"root:x:0:0\n" and tree["etc"].target == "/host"
    assert tree["escaped-by-name"].data == b"bad" and tree["escaped-by-link"].data == b"bad"
    assert "dev/mem" not in tree
    assert tree["secret"].mode == 0o644 and tree["private"].mode == 0o755
    outside = [path for path in gateway.root.parent.rglob("escaped-*")]
    assert outside == []


def test_a_layer_the_model_refuses_fails_the_pull_with_its_reason(gateway: Gateway) -> None:
    layers = [LayerBuilder().file("big", bytes(range(256)) * 40_000),
              LayerBuilder().file("top", b"t").hardlink("link", "missing")]
    built = push_image(gateway.registry, "test/refused", "1", layers)

    state, record = pull(gateway, gateway.image("test/refused:1"))

    assert state.is_failed()
    assert "hard link 'link' -> 'missing': the target does not exist" in record["status_message"]
    assert built.layer_digests[1] in record["status_message"]
    assert published_files(gateway) == []


def test_credentials_from_the_configuration_open_a_basic_auth_registry(gateway: Gateway, basic_registry) -> None:
    user, password = basic_registry.credentials
    push_image(basic_registry, "private/app", "1", [LayerBuilder().file("p", b"p")])
    host = basic_registry.host

    gateway.write_config(Locations={host: {"url": basic_registry.url, "username": "nobody", "password": "x"}})
    refused_state, refused = pull(gateway, f"{host}/private/app:1")
    gateway.write_config(Locations={host: {"url": basic_registry.url, "username": user, "password": password}})
    state, record = pull(gateway, f"{host}/private/app:1")

    assert refused_state.is_failed() and refused["status"] == "FAILURE"
    assert host in refused["status_message"] and password not in refused["status_message"]
    assert state.is_completed() and record["status"] == "READY"


def test_token_registry_is_pulled_through_the_anonymous_bearer_flow(gateway: Gateway, token_registry) -> None:
    push_image(token_registry, "public/app", "1", [LayerBuilder().file("t", b"t")])
    host = token_registry.host
    gateway.write_config(Locations={host: {"url": token_registry.url}})

    state, record = pull(gateway, f"{host}/public/app:1")

    assert state.is_completed(), record["status_message"]
    assert any(user is None for user, _ in token_registry.token_server.requests)


def pull_report(state) -> dict[str, str]:
    """The rows of the report artifact the pull's flow run left on the Prefect server: {name: value}."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    this_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=this_run)
    assert [artifact.type for artifact in artifacts] == ["markdown"]
    rows = [line.strip("|").split("|") for line in artifacts[0].data.splitlines() if line.startswith("| ")]
    return {"key": artifacts[0].key, "text": artifacts[0].data,
            **{name.strip(): value.strip().strip("`") for name, value in rows}}


def test_each_pull_leaves_a_report_of_what_it_fetched_built_and_published(gateway: Gateway) -> None:
    base = LayerBuilder().file("base.bin", os.urandom(50_000))
    push_image(gateway.registry, "test/base", "1", [base])
    built = push_image(gateway.registry, "test/report", "1", [base, LayerBuilder().file("top", os.urandom(30_000))])
    image = gateway.image("test/report:1")
    pull(gateway, gateway.image("test/base:1"))  # leaves the base layer in the cache

    state, _ = pull(gateway, image)
    repull_state, _ = pull(gateway, image)

    report = pull_report(state)
    image_id = built.manifest_digest.removeprefix("sha256:")
    assert report["key"] == "pull-mycluster-" + re.sub(r"[^a-z0-9]+", "-", image.lower())
    assert report["manifest digest"] == built.manifest_digest and report["architecture"] == "amd64"
    assert (report["layers"], report["layers fetched"], report["layers from the cache"]) == ("2", "1", "1")
    top_bytes = gateway.registry.blob_path(built.layer_digests[1]).stat().st_size
    assert report["downloaded"].endswith(f"({top_bytes} bytes)")
    assert report["compressor"] == "gzip level 1"
    squashfs = gateway.image_dir / f"{image_id}.squashfs"
    assert report["published"] == str(squashfs)
    assert report["squashfs"].endswith(f"({squashfs.stat().st_size} bytes)")
    assert {"resolve", "pull", "unpack", "squash", "transfer", "index"} <= report.keys()
    again = pull_report(repull_state)
    assert again["key"] == report["key"] and "Already READY" in again["text"]
    assert again["downloaded"] == "0 bytes" and again["published"] == str(squashfs)
    assert "pull" not in again and "squash" not in again  # no stage that did not run is timed
