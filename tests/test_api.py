"""The REST API through real parts: munged credentials, registry, SecantusDB, Prefect, squashfs."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pymongo

from tests.api_fixtures import Api, logins
from tests.fake_registry import FakeRegistry
from testsupport.images import LayerBuilder, push_image


def ready_image(api: Api, repository: str, **options) -> tuple[str, dict]:
    push_image(api.gateway.registry, repository, "1", [LayerBuilder().file("f", repository.encode())])
    image = api.gateway.image(f"{repository}:1")
    record = api.pull_until_ready(image, **options)
    assert record["status"] == "READY", record
    return image, record


def test_pull_returns_a_pending_record_then_lookup_finds_it_ready(api: Api) -> None:
    push_image(api.gateway.registry, "api/app", "1", [LayerBuilder().file("a", b"a")])
    image = api.gateway.image("api/app:1")

    first = api.pull(image)

    assert first.status_code == 200
    assert first.json()["status"] in ("INIT", "PENDING", "PULLING", "EXAMINATION", "CONVERSION", "TRANSFER")
    assert first.json()["id"] == "MISSING"
    record = api.pull_until_ready(image)
    assert record["status"] == "READY" and record["tag"] == [image]
    looked_up = api.lookup(image)
    assert looked_up.status_code == 200 and looked_up.json()["id"] == record["id"]
    listed = api.call("GET", "/api/list/mycluster/").json()["list"]
    assert [entry["id"] for entry in listed] == [record["id"]]


def test_responses_are_plain_json_with_a_length(api: Api) -> None:
    response = api.call("GET", "/api/list/mycluster/")

    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["content-length"]) == len(response.content)
    assert "transfer-encoding" not in response.headers


def test_percent_encoded_tags_and_latest_are_understood(api: Api) -> None:
    push_image(api.gateway.registry, "api/enc", "latest", [LayerBuilder().file("e", b"e")])
    bare = api.gateway.image("api/enc")
    record = api.pull_until_ready(bare.replace("/", "%2F"))

    assert record["status"] == "READY" and record["tag"] == [bare + ":latest"]
    encoded = (bare + ":latest").replace("/", "%2F").replace(":", "%3A")
    assert api.lookup(encoded).json()["id"] == record["id"]
    assert api.call("GET", f"/api/lookup/mycluster/docker/{bare}").status_code == 200  # no trailing slash


def test_concurrent_identical_pulls_start_exactly_one_flow_run(api: Api) -> None:
    push_image(api.gateway.registry, "api/busy", "1", [LayerBuilder().file("b", b"b" * 100000)])
    image = api.gateway.image("api/busy:1")
    credentials = [api.munged.mint(uid=1000 + n, gid=1000) for n in range(20)]
    statuses: list[int] = []
    barrier = threading.Barrier(20)

    def request(credential: str) -> None:
        barrier.wait()
        statuses.append(api.pull(image, credential=credential).status_code)

    threads = [threading.Thread(target=request, args=(credential,)) for credential in credentials]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert statuses == [200] * 20
    assert api.launcher.launched.count(api.launcher.launched[0]) == len(api.launcher.launched) == 1
    assert api.pull_until_ready(image)["status"] == "READY"


def test_a_fresh_ready_image_is_returned_without_a_new_run(api: Api) -> None:
    image, record = ready_image(api, "api/fresh")
    launched = len(api.launcher.launched)

    again = api.pull(image).json()

    assert again["status"] == "READY" and again["id"] == record["id"]
    assert len(api.launcher.launched) == launched


def test_private_image_is_visible_only_to_its_users_groups_and_admins(api: Api, basic_registry) -> None:
    user, password = basic_registry.credentials
    push_image(basic_registry, "secret/app", "1", [LayerBuilder().file("s", b"s")])
    image = f"{basic_registry.host}/secret/app:1"
    api.reconfigure(
        Locations={basic_registry.host: {"url": basic_registry.url}},
        Platforms={"mycluster": {"accesstype": "local", "local": {"imageDir": str(api.gateway.image_dir)},
                                 "mungeSocketPath": api.munged.socket_path, "admins": ["root"]}})
    payload = logins(**{basic_registry.host: f"{user}:{password}"})

    record = api.pull_until_ready(image, uid=1000, gid=1000, payload=payload, json={"allowed_gids": "4242"})

    assert record["status"] == "READY", record
    assert record["userACL"] == [1000] and record["groupACL"] == [1000, 4242]
    assert api.lookup(image, uid=1000, gid=1000).status_code == 200
    assert api.lookup(image, uid=3000, gid=4242).status_code == 200
    assert api.lookup(image, uid=0, gid=0).status_code == 200
    hidden = api.lookup(image, uid=2000, gid=2000)
    assert hidden.status_code == 404 and "no READY image" in hidden.json()["error"]
    assert api.call("GET", "/api/list/mycluster/", uid=2000, gid=2000).json()["list"] == []
    meta = (api.gateway.image_dir / f"{record['id']}.meta").read_text().splitlines()
    assert "USERACL: 1000" in meta and "GROUPACL: 1000,4242" in meta
    stored = pymongo.MongoClient(api.gateway.mongo_uri)[api.gateway.database]
    assert stored["pull_logins"].count_documents({}) == 0  # the login was used once and is gone
    assert password not in (api.gateway.root / "imagemanager.json").read_text()


def test_a_public_image_stays_public(api: Api) -> None:
    _, record = ready_image(api, "api/public", json={"allowed_uids": "5"})

    assert record["userACL"] == [] and record["groupACL"] == []
    assert api.lookup(api.gateway.image("api/public:1"), uid=4321, gid=4321).status_code == 200


def test_credential_errors_are_401_saying_why(api: Api, munged) -> None:
    replayed = munged.mint(uid=1000, gid=1000)
    assert api.call("GET", "/api/list/mycluster/", credential=replayed).status_code == 200
    expired = munged.mint(uid=1000, gid=1000, ttl=1)
    time.sleep(2.1)

    cases = {"missing": api.client.get("/api/list/mycluster/"),
             "replayed": api.call("GET", "/api/list/mycluster/", credential=replayed),
             "expired": api.call("GET", "/api/list/mycluster/", credential=expired),
             "invalid": api.call("GET", "/api/list/mycluster/", credential="MUNGE:garbage:")}

    for reason, response in cases.items():
        assert response.status_code == 401, reason
        assert reason in response.json()["error"]


def test_bad_input_gets_4xx_with_an_error_naming_it(api: Api) -> None:
    cases = [
        (api.call("GET", "/api/list/nosuchsystem/"), 404, "nosuchsystem"),
        (api.lookup("never/pulled:1"), 404, "never/pulled:1"),
        (api.pull("Bad:Name:"), 400, "Bad"),
        (api.pull("x:1", content=b"{not json"), 400, "not JSON"),
        (api.pull("x:1", json=["a"]), 400, "JSON object"),
        (api.pull("x:1", json={"allowed_uids": "12,abc"}), 400, "allowed_uids"),
        (api.call("GET", "/api/lookup/mycluster/weird/x/"), 400, "weird"),
        (api.call("GET", "/api/metrics/mycluster/?limit=zero", uid=0, gid=0), 400, "limit"),
        (api.call("GET", "/api/expire/mycluster/docker/x/"), 403, "admins"),
        (api.call("GET", "/api/autoexpire/mycluster/"), 403, "admins"),
        (api.call("GET", "/api/metrics/mycluster/"), 403, "admins"),
        (api.call("GET", "/api/expire/mycluster/docker/never:1/", uid=0, gid=0), 404, "never:1"),
    ]

    for response, status, words in cases:
        assert response.status_code == status, (response.request.url, response.text)
        assert response.headers["content-type"] == "application/json"
        assert words in response.json()["error"], response.json()


def test_expire_removes_the_files_and_marks_the_image_expired(api: Api) -> None:
    image, record = ready_image(api, "api/old")

    response = api.call("GET", f"/api/expire/mycluster/docker/{image}/", uid=0, gid=0)

    assert response.status_code == 200 and response.json() == {"status": True}
    assert not list(api.gateway.image_dir.glob(f"{record['id']}.*"))
    assert api.lookup(image).status_code == 404
    stored = pymongo.MongoClient(api.gateway.mongo_uri)[api.gateway.database]["images"]
    assert stored.find_one({"id": record["id"]})["status"] == "EXPIRED"


def test_autoexpire_expires_past_due_images_and_clears_failures(api: Api) -> None:
    image, record = ready_image(api, "api/due")
    _, keep = ready_image(api, "api/notdue")
    failed = api.pull_until_ready(api.gateway.image("api/nothere:1"))
    assert failed["status"] == "FAILURE"
    database = pymongo.MongoClient(api.gateway.mongo_uri)[api.gateway.database]
    database["images"].update_one({"id": record["id"]}, {"$set": {"expiration": time.time() - 1}})
    database["pulls"].update_many({"status": "FAILURE"}, {"$set": {"heartbeat": time.time() - 3600}})

    response = api.call("GET", "/api/autoexpire/mycluster/", uid=0, gid=0)

    assert response.json() == {"status": [record["id"]]}
    assert not list(api.gateway.image_dir.glob(f"{record['id']}.*"))
    assert list(api.gateway.image_dir.glob(f"{keep['id']}.*"))
    assert api.call("GET", "/api/queue/mycluster/").json() == {"list": []}


def test_lookup_renews_expiration_and_is_counted_in_metrics(api: Api) -> None:
    image, record = ready_image(api, "api/used")
    images = pymongo.MongoClient(api.gateway.mongo_uri)[api.gateway.database]["images"]
    # Last used two minutes ago: a lookup renews it (at most once a minute, so lookups cost one round trip).
    images.update_one({"id": record["id"]}, {"$inc": {"last_used": -120, "expiration": -120}})
    before = images.find_one({"id": record["id"]})["expiration"]

    api.lookup(image, uid=1000, gid=1000)

    renewed = images.find_one({"id": record["id"]})["expiration"]
    assert renewed > before
    api.lookup(image, uid=1000, gid=1000)
    assert images.find_one({"id": record["id"]})["expiration"] == renewed, "renewed again within the minute"
    rows = api.call("GET", "/api/metrics/mycluster/?limit=5", uid=0, gid=0).json()
    assert rows[0]["uid"] == 1000 and rows[0]["id"] == record["id"] and rows[0]["tag"] == image


def test_queue_lists_failed_pulls_with_their_tag(api: Api) -> None:
    api.pull_until_ready(api.gateway.image("api/missing:1"))

    listed = api.call("GET", "/api/queue/mycluster/").json()["list"]

    assert listed == [{"status": "FAILURE", "image": api.gateway.image("api/missing:1")}]


def test_doimport_publishes_a_users_squashfs(api: Api, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello").write_text("imported\n")
    squashfs = tmp_path / "mine.squashfs"
    subprocess.run(["mksquashfs", str(tree), str(squashfs), "-quiet", "-no-progress"], check=True)
    not_squashfs = tmp_path / "notes.txt"
    not_squashfs.write_text("hello")

    imported = api.call("POST", "/api/doimport/mycluster/custom/mine:1/", uid=0, gid=0,
                        json={"filepath": str(squashfs), "format": "squashfs"})
    refused = api.call("POST", "/api/doimport/mycluster/custom/mine:2/", uid=1000, gid=1000,
                       json={"filepath": str(squashfs)})
    wrong = api.call("POST", "/api/doimport/mycluster/custom/mine:3/", uid=0, gid=0,
                     json={"filepath": str(not_squashfs)})

    assert imported.status_code == 200, imported.text
    record = imported.json()
    assert record["status"] == "READY" and record["tag"] == ["mine:1"]
    assert (api.gateway.image_dir / f"{record['id']}.squashfs").read_bytes() == squashfs.read_bytes()
    assert api.call("GET", "/api/lookup/mycluster/custom/mine:1/").json()["id"] == record["id"]
    assert refused.status_code == 403 and "ImportUsers" in refused.json()["error"]
    assert wrong.status_code == 400 and "not a squashfs" in wrong.json()["error"]


def test_healthz_reports_each_dependency(api: Api) -> None:
    response = api.client.get("/healthz")

    checks = response.json()["checks"]
    assert checks["mongodb"] == "up" and checks["munge:mycluster"] == "up"
    assert checks["prefect"] == "up"


def test_mongodb_down_is_503_and_the_api_recovers_when_it_returns(api: Api, tmp_path: Path, monkeypatch) -> None:
    import socket
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "secantus", "--host", "127.0.0.1", "--port", str(port),
               "--storage-path", str(tmp_path / "mongo")]
    (tmp_path / "mongo").mkdir()

    def start() -> subprocess.Popen:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return server
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("SecantusDB did not start")

    server = start()
    monkeypatch.delenv("IMAGEGW_MONGODB_URI", raising=False)  # the session's embedded server exported it
    api.gateway.mongo_uri = f"mongodb://127.0.0.1:{port}"
    api.gateway.write_config(
        Platforms={"mycluster": {"accesstype": "local", "local": {"imageDir": str(api.gateway.image_dir)},
                                 "mungeSocketPath": api.munged.socket_path}})
    from fastapi.testclient import TestClient

    from api.app import create_app
    from imagegw.config import load_settings

    client = TestClient(create_app(load_settings(api.gateway.config_path), api.launcher))
    list_path = "/api/list/mycluster/"
    try:
        assert client.get(list_path, headers={"authentication": api.munged.mint()}).status_code == 200
        server.terminate()
        server.wait(10)

        down = client.get(list_path, headers={"authentication": api.munged.mint()})
        health = client.get("/healthz")

        assert down.status_code == 503 and "MongoDB" in down.json()["error"]
        assert health.status_code == 503 and health.json()["checks"]["mongodb"].startswith("down")
        server = start()
        assert client.get(list_path, headers={"authentication": api.munged.mint()}).status_code == 200
    finally:
        server.terminate()
        server.wait(10)


def test_odd_input_never_gets_a_server_error(api: Api) -> None:
    odd_tags = ["%00", "..%2F..%2Fetc%2Fpasswd", "caf%C3%A9:1", "a" * 3000, "x@sha256:zz", "%25", ":", "@"]
    for tag in odd_tags:
        for method, path in (("GET", f"/api/lookup/mycluster/docker/{tag}/"),
                             ("POST", f"/api/pull/mycluster/docker/{tag}/"),
                             ("GET", f"/api/expire/mycluster/docker/{tag}/")):
            response = api.call(method, path, uid=0, gid=0)
            assert 400 <= response.status_code < 500, (path, response.status_code, response.text)
            assert "error" in response.json()


def test_openapi_documentation_is_served(api: Api) -> None:
    assert api.client.get("/docs").status_code == 200
    paths = api.client.get("/openapi.json").json()["paths"]
    assert "/api/pull/{system}/{itype}/{tag}/" in paths


def test_a_default_login_goes_to_the_default_location_only(api: Api, basic_registry) -> None:
    user, password = basic_registry.credentials
    push_image(basic_registry, "secret/default", "1", [LayerBuilder().file("s", b"s")])
    snoop = FakeRegistry()  # another registry, asking for Basic credentials: would it get the user's?
    snoop.routes["/v2/x/app/manifests/1"] = lambda seen: (401, {"WWW-Authenticate": 'Basic realm="snoop"'}, b"")
    platform = {"accesstype": "local", "local": {"imageDir": str(api.gateway.image_dir)},
                "mungeSocketPath": api.munged.socket_path}
    api.reconfigure(DefaultImageLocation="site",
                    Locations={"site": {"url": basic_registry.url}, snoop.host: {"url": snoop.url}},
                    Platforms={"mycluster": platform})
    payload = logins(default=f"{user}:{password}")
    try:
        ready = api.pull_until_ready("secret/default:1", payload=payload)
        refused = api.pull_until_ready(f"{snoop.host}/x/app:1", payload=payload)
    finally:
        snoop.stop()

    assert ready["status"] == "READY", ready
    assert refused["status"] == "FAILURE" and "requires credentials" in refused["status_message"]
    sent = [seen.headers.get("authorization") for seen in snoop.seen]
    assert sent and sent == [None] * len(sent), "the default login was sent to a registry that is not the default"


def test_a_registry_not_allowed_is_refused_before_any_request(api: Api) -> None:
    elsewhere = FakeRegistry()
    try:
        response = api.pull(f"{elsewhere.host}/x/app:1")
    finally:
        elsewhere.stop()
    assert response.status_code == 400
    assert response.json()["error"] == (f"registry {elsewhere.host} is not allowed on this gateway "
                                        "(AllowedRegistries in its configuration)")
    assert elsewhere.seen == [] and api.launcher.launched == []
