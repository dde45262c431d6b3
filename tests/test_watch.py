"""Watch list entries: what operators may write, and the ``imagegw watch`` commands that keep them."""

from __future__ import annotations

import re

import pytest

from cli.main import main
from imagegw.config import Settings, load_settings
from imagegw.errors import BadImageReference
from imagegw.watch import parse_watched
from tests.gateway_fixtures import Gateway


@pytest.fixture
def settings(gateway: Gateway) -> Settings:
    return load_settings(gateway.config_path)


def test_a_tag_pattern_matches_tags_of_its_repository_only(settings: Settings, gateway: Gateway) -> None:
    watched = parse_watched(gateway.image("team/app:v1.*"), settings)
    host = gateway.registry.host
    assert watched.is_pattern
    assert watched.matches(host, "team/app", "v1.2")
    assert not watched.matches(host, "team/app", "v2.0")
    assert not watched.matches(host, "team/other", "v1.2")
    assert not watched.matches("elsewhere:5000", "team/app", "v1.2")
    assert watched.image_for("v1.2") == gateway.image("team/app:v1.2")


def test_a_plain_entry_gets_latest_and_the_default_location(settings: Settings) -> None:
    watched = parse_watched("team/app", settings)
    assert watched.image == "team/app:latest"
    assert not watched.is_pattern
    assert watched.repository.repository == "team/app"
    assert watched.repository.location.name == "testreg"


@pytest.mark.parametrize(("text", "complaint"), [
    ("team/app@sha256:" + "a" * 64, "not a digest"),
    ("team/app:v1 *", "tag pattern 'v1 *'"),
    ("Team/App:v1.*", "repository component 'Team'"),
])
def test_bad_entries_say_what_is_wrong(settings: Settings, text: str, complaint: str) -> None:
    with pytest.raises(BadImageReference, match=re.escape(complaint)):
        parse_watched(text, settings)


def test_watch_commands_add_list_and_remove(gateway: Gateway, capsys: pytest.CaptureFixture[str]) -> None:
    config = str(gateway.config_path)
    pattern = gateway.image("team/app:v1.*")
    assert main(["watch", "add", pattern, "-p", "mycluster", "-c", config]) == 0
    assert "watching tag pattern" in capsys.readouterr().err
    assert main(["watch", "add", pattern, "-p", "mycluster", "-c", config]) == 0
    assert "already watching" in capsys.readouterr().err
    assert main(["watch", "add", "ubuntu", "-p", "mycluster", "-c", config]) == 0
    capsys.readouterr()

    assert main(["watch", "list", "-p", "mycluster", "-c", config]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["IMAGE", "ADDED", "BY", "ADDED"]
    assert [row.split()[0] for row in rows[1:]] == [pattern, "ubuntu:latest"]
    assert main(["watch", "list", "-p", "armcluster", "-c", config]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [], "each platform has its own list"

    assert main(["watch", "remove", pattern, "-p", "mycluster", "-c", config]) == 0
    assert main(["watch", "remove", pattern, "-p", "mycluster", "-c", config]) == 1
    assert "does not watch" in capsys.readouterr().err
    assert main(["watch", "add", "x:v1 *", "-p", "mycluster", "-c", config]) == 2
