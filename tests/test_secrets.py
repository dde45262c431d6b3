"""Registry secrets stay secret: private images pulled through every credential source (a cloud's too, emulated),
then every place the gateway writes is searched for every password and token. None may be found anywhere."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pymongo
import pytest
from bson import json_util
from prefect.client.orchestration import get_client

from cli.main import main
from imagegw.store import PullKey
from tests.api_fixtures import Api, logins
from tests.gateway_fixtures import pull
from tests.iaas_fixtures import AWS_SECRET
from testsupport.iaas import EcrApi
from testsupport.images import LayerBuilder, push_image
from testsupport.registry import RunningRegistry


def secret_forms(secret: str, user: str) -> list[bytes]:
    """The secret as it could leak: itself, and inside a Basic header."""
    return [secret.encode(), base64.b64encode(f"{user}:{secret}".encode())]


def prefect_records() -> str:
    """Everything the Prefect API holds about runs: parameters, task inputs, logs, artifacts, states."""
    parts: list[str] = []
    with get_client(sync_client=True) as client:
        for read in (client.read_flow_runs, client.read_task_runs, client.read_logs, client.read_artifacts):
            offset = 0
            while page := read(limit=200, offset=offset):
                parts += [item.model_dump_json() for item in page]
                offset += len(page)
    return "\n".join(parts)


def mongo_documents(api: Api) -> bytes:
    database = pymongo.MongoClient(api.gateway.mongo_uri)[api.gateway.database]
    return b"\n".join(json_util.dumps(document).encode() + repr(document).encode()
                      for name in database.list_collection_names() for document in database[name].find())


def files_under(*roots: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for root in roots if root.exists() for path in root.rglob("*") if path.is_file()}


def test_no_password_or_token_is_found_anywhere(api: Api, basic_registry: RunningRegistry,
                                                token_registry: RunningRegistry, ecr: EcrApi, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    user, password = basic_registry.credentials or ("", "")
    tokens = token_registry.token_server
    assert tokens is not None
    identity_token = tokens.issue_refresh_token(user)
    secrets_dir = tmp_path.parent / f"{tmp_path.name}-secrets"
    secrets_dir.mkdir()
    (secrets_dir / "password").write_text(password)
    docker_config = secrets_dir / "docker"
    docker_config.mkdir()
    basic, token = basic_registry.host, token_registry.host
    api.reconfigure(Locations={basic: {"url": basic_registry.url}, token: {"url": token_registry.url},
                               "filed": {"url": basic_registry.url, "username": user,
                                         "passwordFile": str(secrets_dir / "password")},
                               "cloud": {"url": basic_registry.url, "iaas": "ecr"}},
                    Platforms={"mycluster": {"accesstype": "local", "local": {"imageDir": str(api.gateway.image_dir)},
                                             "mungeSocketPath": api.munged.socket_path}})
    for name in ("request", "environment", "flags", "configuration", "docker", "identity", "token", "iaas"):
        push_image(basic_registry, f"sealed/{name}", "1", [LayerBuilder().file("s", name.encode())],
                   auth=(user, password))
        push_image(token_registry, f"sealed/{name}", "1", [LayerBuilder().file("s", name.encode())],
                   auth=(user, password))
    config = str(api.gateway.config_path)

    def pulled(image: str) -> None:
        record = api.gateway.store().lookup(PullKey("mycluster", "docker", image))
        assert record is not None and record["status"] == "READY", image

    record = api.pull_until_ready(f"{basic}/sealed/request:1", payload=logins(**{basic: f"{user}:{password}"}))
    assert record["status"] == "READY", record
    assert main(["pull", f"{basic}/sealed/flags:1", "-p", "mycluster", "-c", config,
                 "--registry-username", user, "--registry-password", password]) == 0
    assert main(["pull", "filed/sealed/configuration:1", "-p", "mycluster", "-c", config]) == 0
    registry_token = tokens.issue_token(user, ["repository:sealed/token:pull"])
    assert main(["pull", f"{token}/sealed/token:1", "-p", "mycluster", "-c", config,
                 "--registry-token", registry_token]) == 0
    with monkeypatch.context() as env:
        env.setenv("IMAGEGW_REGISTRY_HOSTNAME_SITE", basic)
        env.setenv("IMAGEGW_REGISTRY_USERNAME_SITE", user)
        env.setenv("IMAGEGW_REGISTRY_PASSWORD_SITE", password)
        env.setenv("IMAGEGW_REGISTRY_HOSTNAME_ID", token)
        env.setenv("IMAGEGW_REGISTRY_IDENTITY_TOKEN_ID", identity_token)
        grants = len(tokens.grants)
        assert pull(api.gateway, f"{basic}/sealed/environment:1")[0].is_completed()
        assert pull(api.gateway, f"{token}/sealed/identity:1")[0].is_completed()
        assert "refresh_token" in tokens.grants[grants:], "the identity token was used"
    with monkeypatch.context() as env:
        env.setenv("IMAGEGW_ENABLE_IAAS_AUTH", "true")
        ecr.token = f"{user}:{password}"  # what the emulated ECR API hands out
        assert pull(api.gateway, "cloud/sealed/iaas:1")[0].is_completed()
        assert ecr.requests, "the credential came from the ECR API"
    with monkeypatch.context() as env:
        auth = base64.b64encode(f"{user}:{password}".encode()).decode()
        (docker_config / "config.json").write_text(json.dumps({"auths": {basic: {"auth": auth}}}))
        env.setenv("DOCKER_CONFIG", str(docker_config))
        assert pull(api.gateway, f"{basic}/sealed/docker:1")[0].is_completed()
    for image in (f"{basic}/sealed/flags:1", "filed/sealed/configuration:1", f"{token}/sealed/token:1",
                  "cloud/sealed/iaas:1",
                  f"{basic}/sealed/environment:1", f"{basic}/sealed/docker:1"):
        pulled(image)

    captured = capfd.readouterr()
    places: dict[str, bytes] = {
        "the Prefect API": prefect_records().encode(),
        "MongoDB": mongo_documents(api),
        "the gateway's output": (captured.out + captured.err).encode(),
        **{str(path): data for path, data in files_under(api.gateway.root).items()},
    }
    secrets = {"password": secret_forms(password, user), "identity token": [identity_token.encode()],
               "registry token": [registry_token.encode()], "AWS secret key": [AWS_SECRET.encode()]}
    found = [f"{what} in {place}" for place, data in places.items()
             for what, forms in secrets.items() if any(form in data for form in forms)]
    assert found == []
    assert str(api.gateway.config_path) in places["the Prefect API"].decode(), "the sweep read the flow runs"
    assert len(places) > 10, "the sweep looked at the state, cache, expand and image directories"
