"""``imagegw login``: the login is checked against the real registry before it is saved as shifterimg saves it."""

from __future__ import annotations

import getpass
from pathlib import Path

import pytest

from cli.main import main
from imagegw.service.munge import decode_credential
from tests.gateway_fixtures import Gateway
from testsupport.munge import RunningMunged
from testsupport.registry import RunningRegistry


@pytest.fixture
def site(gateway: Gateway, munged: RunningMunged, basic_registry: RunningRegistry, token_registry: RunningRegistry,
         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Gateway:
    gateway.write_config(DefaultImageLocation="basic", Locations={
        "basic": {"url": basic_registry.url}, "token": {"url": token_registry.url}},
        Platforms={"mycluster": {"accesstype": "local", "local": {"imageDir": str(gateway.image_dir)},
                                 "mungeSocketPath": munged.socket_path}})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return gateway


def answer(monkeypatch: pytest.MonkeyPatch, username: str, password: str) -> None:
    monkeypatch.setattr("builtins.input", lambda prompt: username)
    monkeypatch.setattr(getpass, "getpass", lambda prompt: password)


@pytest.mark.parametrize("location", ["default", "token"])
def test_a_login_the_registry_accepts_is_saved_for_shifterimg(site: Gateway, munged: RunningMunged,
                                                               basic_registry: RunningRegistry, location: str,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    user, password = basic_registry.credentials or ("", "")
    answer(monkeypatch, user, password)

    assert main(["login", location, "-p", "mycluster", "-c", str(site.config_path)]) == 0

    assert "accepted by" in capsys.readouterr().err
    cred = tmp_path / "home" / ".udiRoot" / ".cred"
    assert cred.stat().st_mode & 0o777 == 0o600
    [line] = cred.read_text().splitlines()
    name, credential = line.split("=", 1)
    assert name == f"mycluster:{location}"
    assert password not in line
    assert decode_credential(credential, munged.socket_path).payload == f"{user}:{password}".encode()


def test_a_refused_login_is_not_saved(site: Gateway, basic_registry: RunningRegistry, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    user, password = basic_registry.credentials or ("", "")
    for location in ("default", "token"):
        answer(monkeypatch, user, "not-" + password)
        assert main(["login", location, "-p", "mycluster", "-c", str(site.config_path)]) == 2
        error = capsys.readouterr().err
        assert "authentication failed for" in error and "not-" + password not in error
    assert not (tmp_path / "home" / ".udiRoot" / ".cred").exists()
    assert main(["login", "nowhere", "-p", "mycluster", "-c", str(site.config_path)]) == 2
    assert "location 'nowhere' is not in Locations" in capsys.readouterr().err


def test_a_second_login_replaces_the_first_and_keeps_the_others(site: Gateway, basic_registry: RunningRegistry,
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    user, password = basic_registry.credentials or ("", "")
    answer(monkeypatch, user, password)
    for location in ("default", "token", "default"):
        assert main(["login", location, "-p", "mycluster", "-c", str(site.config_path)]) == 0
    lines = (tmp_path / "home" / ".udiRoot" / ".cred").read_text().splitlines()
    assert sorted(line.split("=", 1)[0] for line in lines) == ["mycluster:default", "mycluster:token"]
