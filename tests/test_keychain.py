"""Which source's credential a pull uses: the first that has one, in imgpkg's order."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from imagegw.config import Location
from imagegw.registry import Credential, ImageRef
from imagegw.registry.keychain import FLAGS, REQUEST, HandedCredential, Keychain

HOST = "reg.site.example:5000"
CONFIGURED = Location(name="site", url=f"https://{HOST}", username="config-user", password="config-pass")
BARE = Location(name="site", url=f"https://{HOST}")
ENVIRONMENT = {"IMAGEGW_REGISTRY_HOSTNAME_SITE": HOST, "IMAGEGW_REGISTRY_USERNAME_SITE": "env-user",
               "IMAGEGW_REGISTRY_PASSWORD_SITE": "env-pass"}
REQUESTED = HandedCredential(Credential("the request", username="request-user", password="p"), REQUEST)
FLAGGED = HandedCredential(Credential("flag --registry-username", username="flag-user", password="p"), FLAGS)
ANONYMOUS = HandedCredential(Credential("flag --registry-anon"), FLAGS)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    auth = base64.b64encode(b"docker-user:docker-pass").decode()
    (tmp_path / ".docker").mkdir()
    (tmp_path / ".docker" / "config.json").write_text(json.dumps({"auths": {HOST: {"auth": auth}}}))
    return tmp_path


def user(keychain: Keychain, location: Location, handed: HandedCredential | None = None) -> str | None:
    credential = keychain.credential_for(ImageRef(location, "team/app", "1"), handed)
    return credential.username if credential else None


@pytest.mark.parametrize("environment, location, handed, expected", [
    (ENVIRONMENT, CONFIGURED, REQUESTED, "request-user"),  # 0: the request beats everything
    (ENVIRONMENT, CONFIGURED, FLAGGED, "env-user"),  # 1: the environment beats flags and configuration
    ({}, CONFIGURED, FLAGGED, "flag-user"),  # 2: flags beat the configuration
    ({}, CONFIGURED, None, "config-user"),  # 2: the configuration beats the docker config
    ({}, BARE, None, "docker-user"),  # 3: the docker config, last
    ({}, BARE, ANONYMOUS, None),  # --registry-anon: anonymous, though the docker config has a login
])
def test_the_first_source_with_a_credential_wins(home: Path, environment: dict[str, str], location: Location,
                                                 handed: HandedCredential | None, expected: str | None) -> None:
    assert user(Keychain(environment, home), location, handed) == expected


def test_no_source_means_anonymous(tmp_path: Path) -> None:
    assert Keychain({}, tmp_path).credential_for(ImageRef(BARE, "team/app", "1")) is None
