"""Which of a user's registry logins goes to which registry."""

from __future__ import annotations

from imagegw.config import Location
from imagegw.registry import RegistryLogin, login_for

SITE = Location(name="site", url="https://registry.site.example")
ELSEWHERE = Location(name="evil.example.com", url="https://evil.example.com")
DEFAULT = RegistryLogin("alice", "default-password")
NAMED = RegistryLogin("alice", "site-password")


def test_the_default_login_is_for_the_default_location() -> None:
    assert login_for({"default": DEFAULT}, SITE, default_location="site") == DEFAULT


def test_the_default_login_never_goes_to_another_registry() -> None:
    assert login_for({"default": DEFAULT}, ELSEWHERE, default_location="site") is None


def test_a_login_naming_the_location_beats_the_default() -> None:
    for key in ("site", "registry.site.example"):
        assert login_for({"default": DEFAULT, key: NAMED}, SITE, default_location="site") == NAMED


def test_a_login_naming_another_registry_goes_there() -> None:
    assert login_for({"evil.example.com": NAMED}, ELSEWHERE, default_location="site") == NAMED
