"""Registry credentials from a docker config: real files, and real helper programs on PATH."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from imagegw.config import DOCKER_HUB_HOSTS
from imagegw.errors import ConfigError
from imagegw.registry import Credential, dockerconfig
from imagegw.registry.dockerconfig import DOCKER_HUB_KEY, DockerConfigCredentials

# Every secret holds "s3cr3t", so one substring check finds a leak of any of them.
PASSWORD = "file-s3cr3t:with:colons"
HELPER_SECRET = "helper-s3cr3t"
IDENTITY_TOKEN = "identity-s3cr3t"
REGISTRY_TOKEN = "registry-s3cr3t"

HELPERS = {
    # Echoes the server URL it was asked about in the username, so tests see what docker would send.
    "answer": 'server=$(cat)\nprintf \'{"ServerURL": "%s", "Username": "user-for-%s", "Secret": "'
              + HELPER_SECRET + '"}\\n\' "$server" "$server"\n',
    "token": f'cat >/dev/null\necho \'{{"ServerURL": "x", "Username": "<token>", "Secret": "{IDENTITY_TOKEN}"}}\'\n',
    "none": "echo 'credentials not found in native keychain'\nexit 1\n",
    "empty": 'echo \'{"ServerURL": "", "Username": "", "Secret": ""}\'\n',
    "broken": "echo 'pass store is locked'\nexit 3\n",
    "garbage": f"echo '{HELPER_SECRET}'\n",
    "slow": "exec sleep 10\n",
}


def auth(user_password: str) -> str:
    return base64.b64encode(user_password.encode()).decode()


@pytest.fixture(autouse=True)
def helpers_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each helper in HELPERS as an executable ``docker-credential-<name>`` first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in HELPERS.items():
        program = bin_dir / f"docker-credential-{name}"
        program.write_text(f'#!/bin/sh\n[ "$1" = get ] || exit 2\n{body}')
        program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)


def write_config(directory: Path, document: object) -> Path:
    """``document`` (JSON-encoded unless it is text already) as ``directory/config.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return path


def load(tmp_path: Path, document: object) -> DockerConfigCredentials:
    """``document`` as ``~/.docker/config.json`` of a home in ``tmp_path``, loaded."""
    write_config(tmp_path / "home" / ".docker", document)
    loaded = DockerConfigCredentials.load(os.environ, tmp_path / "home")
    assert loaded is not None
    return loaded


def config_file(tmp_path: Path) -> Path:
    return tmp_path / "home" / ".docker" / "config.json"


def alice_at(key: str) -> dict[str, object]:
    return {"auths": {key: {"auth": auth(f"alice:{PASSWORD}")}}}


# Where the config is


def test_no_config_file_is_no_docker_config(tmp_path: Path) -> None:
    assert DockerConfigCredentials.load(os.environ, tmp_path) is None
    assert DockerConfigCredentials.load({"DOCKER_CONFIG": str(tmp_path / "nowhere")}, tmp_path) is None


@pytest.mark.parametrize("docker_config, expected", [
    ("elsewhere", "elsewhere/config.json"),
    ("", "home/.docker/config.json"),  # empty is unset, as in docker
    (None, "home/.docker/config.json"),
])
def test_docker_config_names_the_directory_else_home(tmp_path: Path, docker_config: str | None,
                                                     expected: str) -> None:
    for directory in (tmp_path / "elsewhere", tmp_path / "home" / ".docker"):
        write_config(directory, alice_at("ghcr.io"))
    environ = {} if docker_config is None else {"DOCKER_CONFIG": docker_config and str(tmp_path / docker_config)}
    loaded = DockerConfigCredentials.load(environ, tmp_path / "home")
    assert loaded is not None and loaded.path == tmp_path / expected
    assert loaded.credential_for("ghcr.io") == Credential(f"docker config {tmp_path / expected}", "alice", PASSWORD)


# auths keys


@pytest.mark.parametrize("key, host", [
    ("ghcr.io", "ghcr.io"),
    ("127.0.0.1:5000", "127.0.0.1:5000"),
    ("https://ghcr.io", "ghcr.io"),
    ("https://ghcr.io/", "ghcr.io"),
    ("http://127.0.0.1:5000/v1/", "127.0.0.1:5000"),
    ("https://127.0.0.1:5000/v2/", "127.0.0.1:5000"),
    ("registry.example.com:443/some/path", "registry.example.com:443"),
    ("GHCR.io", "ghcr.io"),
    ("ghcr.io", "GHCR.IO"),
])
def test_every_key_form_docker_writes_finds_the_registry(tmp_path: Path, key: str, host: str) -> None:
    credential = load(tmp_path, alice_at(key)).credential_for(host)
    assert credential == Credential(f"docker config {config_file(tmp_path)}", "alice", PASSWORD)


@pytest.mark.parametrize("key, host", [
    ("127.0.0.1:5000", "127.0.0.1"),
    ("127.0.0.1:5000", "127.0.0.1:5001"),
    ("127.0.0.1", "127.0.0.1:5000"),
    ("registry.example.com", "example.com"),
    ("example.com", "registry.example.com"),
    (DOCKER_HUB_KEY, "ghcr.io"),
    (DOCKER_HUB_KEY, "docker.example.com"),
    ("ghcr.io", "docker.io"),
])
def test_a_key_finds_no_other_registry(tmp_path: Path, key: str, host: str) -> None:
    assert load(tmp_path, alice_at(key)).credential_for(host) is None


@pytest.mark.parametrize("key", [DOCKER_HUB_KEY, "docker.io", "index.docker.io", "https://index.docker.io",
                                 "registry-1.docker.io", "https://registry.hub.docker.com/v2/"])
@pytest.mark.parametrize("host", sorted(DOCKER_HUB_HOSTS))
def test_any_docker_hub_alias_finds_the_docker_hub_login(tmp_path: Path, key: str, host: str) -> None:
    assert load(tmp_path, alice_at(key)).credential_for(host) == Credential(
        f"docker config {config_file(tmp_path)}", "alice", PASSWORD)


@pytest.mark.parametrize("keys, host", [
    (["https://ghcr.io", "ghcr.io", "ghcr.io/v1/"], "ghcr.io"),
    (["docker.io", "index.docker.io", DOCKER_HUB_KEY, "https://registry-1.docker.io"], "docker.io"),
])
def test_the_key_docker_looks_up_beats_other_forms_of_it(tmp_path: Path, keys: list[str], host: str) -> None:
    """Docker tries the exact key (``host``, or Docker Hub's own) before converting the others to host names."""
    exact = DOCKER_HUB_KEY if host == "docker.io" else host
    document = {"auths": {key: {"auth": auth(f"user{n}:{PASSWORD}")} for n, key in enumerate(keys)}}
    credential = load(tmp_path, document).credential_for(host)
    assert credential is not None and credential.username == f"user{keys.index(exact)}"


def test_among_converted_keys_the_first_in_the_file_wins(tmp_path: Path) -> None:
    document = {"auths": {f"https://ghcr.io/{n}": {"auth": auth(f"user{n}:{PASSWORD}")} for n in (2, 1, 3)}}
    credential = load(tmp_path, document).credential_for("ghcr.io")
    assert credential is not None and credential.username == "user2"


# auths entries


@pytest.mark.parametrize("entry, expected", [
    ({"auth": auth(f"alice:{PASSWORD}")}, {"username": "alice", "password": PASSWORD}),
    ({"username": "alice", "password": PASSWORD}, {"username": "alice", "password": PASSWORD}),
    ({"auth": auth(f"alice:{PASSWORD}"), "username": "bob", "password": "other"},
     {"username": "alice", "password": PASSWORD}),
    ({"auth": "", "username": "alice", "password": PASSWORD}, {"username": "alice", "password": PASSWORD}),
    ({"auth": auth("alice:")}, {"username": "alice"}),
    ({"identitytoken": IDENTITY_TOKEN}, {"identity_token": IDENTITY_TOKEN}),
    ({"auth": auth(f"alice:{PASSWORD}"), "identitytoken": IDENTITY_TOKEN},
     {"username": "alice", "password": PASSWORD, "identity_token": IDENTITY_TOKEN}),
    ({"registrytoken": REGISTRY_TOKEN}, {"registry_token": REGISTRY_TOKEN}),
    ({}, None),  # the placeholder docker login leaves when a helper holds the secret
    (None, None),
    ({"email": "alice@example.com", "auth": "", "password": None}, None),
])
def test_what_an_auths_entry_holds(tmp_path: Path, entry: object, expected: dict[str, str] | None) -> None:
    credential = load(tmp_path, {"auths": {"ghcr.io": entry}}).credential_for("ghcr.io")
    source = f"docker config {config_file(tmp_path)}"
    assert credential == (None if expected is None else Credential(source, **expected))


# Helpers


def helper_source(name: str, tmp_path: Path) -> str:
    return f"credential helper docker-credential-{name} (docker config {config_file(tmp_path)})"


@pytest.mark.parametrize("host, server", [
    ("ghcr.io", "ghcr.io"),
    ("127.0.0.1:5000", "127.0.0.1:5000"),
    ("registry-1.docker.io", DOCKER_HUB_KEY),  # what docker login stored Docker Hub's secret under
])
def test_a_helper_is_asked_for_the_registry_as_docker_asks(tmp_path: Path, host: str, server: str) -> None:
    assert load(tmp_path, {"credsStore": "answer"}).credential_for(host) == Credential(
        helper_source("answer", tmp_path), f"user-for-{server}", HELPER_SECRET)


@pytest.mark.parametrize("helper, expected", [
    ("token", {"identity_token": IDENTITY_TOKEN}),
    ("none", None),
    ("empty", None),  # docker-credential-pass's way of saying "not found"
])
def test_what_a_helper_answers(tmp_path: Path, helper: str, expected: dict[str, str] | None) -> None:
    credential = load(tmp_path, {"credHelpers": {"ghcr.io": helper}}).credential_for("ghcr.io")
    assert credential == (None if expected is None else Credential(helper_source(helper, tmp_path), **expected))


@pytest.mark.parametrize("document, host, expected_source", [
    # credHelpers[host] first, whatever credsStore and auths say.
    ({"credHelpers": {"ghcr.io": "answer"}, "credsStore": "token", **alice_at("ghcr.io")}, "ghcr.io", "answer"),
    ({"credHelpers": {"https://index.docker.io/v1/": "answer"}, "credsStore": "token"}, "docker.io", "answer"),
    ({"credHelpers": {"docker.io": "answer"}, "credsStore": "token"}, "index.docker.io", "answer"),
    # Then credsStore, for registries credHelpers does not name: the file's entry is only a placeholder.
    ({"credHelpers": {"quay.io": "answer"}, "credsStore": "token", **alice_at("ghcr.io")}, "ghcr.io", "token"),
    # Then the file.
    ({"credHelpers": {"quay.io": "answer"}, **alice_at("ghcr.io")}, "ghcr.io", "file"),
    ({"credsStore": "", **alice_at("ghcr.io")}, "ghcr.io", "file"),
    # A helper's "not found" is final, as in docker: neither credsStore nor the file is asked.
    ({"credHelpers": {"ghcr.io": "none"}, "credsStore": "answer", **alice_at("ghcr.io")}, "ghcr.io", None),
    ({"credsStore": "none", **alice_at("ghcr.io")}, "ghcr.io", None),
])
def test_helper_precedence(tmp_path: Path, document: dict[str, object], host: str,
                           expected_source: str | None) -> None:
    credential = load(tmp_path, document).credential_for(host)
    if expected_source is None:
        assert credential is None
    elif expected_source == "file":
        assert credential is not None and credential.source == f"docker config {config_file(tmp_path)}"
    else:
        assert credential is not None and credential.source == helper_source(expected_source, tmp_path)


@pytest.mark.parametrize("helper, message", [
    ("missing", "docker-credential-missing is not on PATH"),
    ("broken", "failed for ghcr.io (exit status 3): pass store is locked"),
    ("garbage", "the answer for ghcr.io is not JSON with a Username and a Secret"),
])
def test_a_helper_that_cannot_answer_is_an_error(tmp_path: Path, helper: str, message: str) -> None:
    loaded = load(tmp_path, {"credHelpers": {"ghcr.io": helper}})
    with pytest.raises(ConfigError) as raised:
        loaded.credential_for("ghcr.io")
    assert str(raised.value).startswith(helper_source(helper, tmp_path))
    assert message in str(raised.value)
    assert "s3cr3t" not in str(raised.value)


def test_a_helper_that_hangs_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dockerconfig, "HELPER_TIMEOUT_SECONDS", 0.3)
    loaded = load(tmp_path, {"credsStore": "slow"})
    with pytest.raises(ConfigError, match="docker-credential-slow .*: no answer for ghcr.io in 0.3 s"):
        loaded.credential_for("ghcr.io")


def test_helpers_run_in_the_environment_given(tmp_path: Path) -> None:
    """The gateway's PATH finds the helper; a PATH without the helper's directory does not."""
    write_config(tmp_path / "conf", {"credsStore": "answer"})
    loaded = DockerConfigCredentials.load({"DOCKER_CONFIG": str(tmp_path / "conf"), "PATH": "/usr/bin:/bin"},
                                          tmp_path)
    assert loaded is not None
    with pytest.raises(ConfigError, match="docker-credential-answer is not on PATH"):
        loaded.credential_for("ghcr.io")


# Malformed files


@pytest.mark.parametrize("document, message", [
    ("{", "is not JSON"),
    ("", "is not JSON"),
    ("[]", "must be a JSON object"),
    ({"auths": []}, "auths must be a JSON object"),
    ({"auths": {"ghcr.io": "alice:" + PASSWORD}}, "auths['ghcr.io'] must be a JSON object"),
    ({"auths": {"ghcr.io": {"auth": "not base64 s3cr3t"}}}, "auths['ghcr.io'].auth is not base64"),
    ({"auths": {"ghcr.io": {"auth": auth("s3cr3t")[:-1]}}}, "auths['ghcr.io'].auth is not base64"),
    ({"auths": {"ghcr.io": {"auth": "é" + auth("a:s3cr3t")}}}, "auths['ghcr.io'].auth is not base64"),
    ({"auths": {"ghcr.io": {"auth": base64.b64encode(b"\xff:s3cr3t").decode()}}}, "auth is not base64 of UTF-8"),
    ({"auths": {"ghcr.io": {"auth": auth("alice-s3cr3t")}}}, "auths['ghcr.io'].auth has no ':'"),
    ({"auths": {"ghcr.io": {"password": ["s3cr3t"]}}}, "auths['ghcr.io']: password must be a string"),
    ({"auths": {"ghcr.io": {"identitytoken": 1234}}}, "auths['ghcr.io']: identitytoken must be a string"),
    ({"credHelpers": "pass"}, "credHelpers must be a JSON object"),
    ({"credHelpers": {"ghcr.io": ""}}, "credHelpers['ghcr.io'] must name a helper"),
    ({"credHelpers": {"ghcr.io": ["pass"]}}, "credHelpers['ghcr.io'] must name a helper"),
    ({"credsStore": {"name": "pass"}}, "credsStore must be a string"),
])
def test_a_malformed_file_is_an_error_naming_file_and_key(tmp_path: Path, document: object, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, document)
    assert str(raised.value).startswith(f"docker config {config_file(tmp_path)}")
    assert message in str(raised.value)
    assert "s3cr3t" not in str(raised.value)


def test_an_unreadable_file_is_an_error(tmp_path: Path) -> None:
    config_file(tmp_path).mkdir(parents=True)
    with pytest.raises(ConfigError, match="config.json cannot be read: Is a directory"):
        DockerConfigCredentials.load(os.environ, tmp_path / "home")


def test_a_file_that_is_not_text_is_an_error(tmp_path: Path) -> None:
    config_file(tmp_path).parent.mkdir(parents=True)
    config_file(tmp_path).write_bytes(b'{"auths": {"ghcr.io": {"password": "s3cr3t\xff"}}}')
    with pytest.raises(ConfigError, match="config.json is not UTF-8 text") as raised:
        DockerConfigCredentials.load(os.environ, tmp_path / "home")
    assert "s3cr3t" not in str(raised.value)


# Secrets


def test_no_secret_in_any_repr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_TOKEN", "environment-s3cr3t")
    loaded = load(tmp_path, {
        "auths": {"ghcr.io": {"auth": auth(f"alice:{PASSWORD}"), "identitytoken": IDENTITY_TOKEN,
                              "registrytoken": REGISTRY_TOKEN}},
        "credHelpers": {"quay.io": "answer", "token.example.com": "token"},
    })
    credentials = [loaded.credential_for(host) for host in ("ghcr.io", "quay.io", "token.example.com")]
    assert all(credentials)
    for shown in [repr(loaded), str(loaded), *map(repr, credentials)]:
        assert "s3cr3t" not in shown
