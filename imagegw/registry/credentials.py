"""Registry logins that users hand the gateway inside their MUNGE credential.

Shifter's client sends ``{"authorized_locations": {"default": "user:pass",
"<location>": "user:pass"}}`` as the credential's payload. A login is used for
the location it names (by name or host); ``default`` only for the default location. Only the first colon separates user
from password: passwords may hold colons (Shifter dropped them). Logins are
never logged and never shown in messages or reprs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from imagegw.config import Location
from imagegw.errors import AuthenticationFailed


@dataclass(frozen=True)
class RegistryLogin:
    """A username and password for one registry."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Credential:
    """What to authenticate to a registry with, and where it came from.

    One of: a username and password (Basic, or exchanged for a Bearer token); an identity token
    (an OAuth2 refresh token, exchanged at the token service); a registry token (sent as it is,
    as ``Bearer``). ``source`` names where it was found for messages ("environment
    IMAGEGW_REGISTRY_*_CI", "docker config /root/.docker/config.json", …); never the secret.
    """

    source: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    identity_token: str | None = field(default=None, repr=False)
    registry_token: str | None = field(default=None, repr=False)

    @property
    def has_password(self) -> bool:
        """Basic credentials are sent only when both parts are there."""
        return bool(self.username and self.password)


def parse_authorized_locations(payload: bytes) -> dict[str, RegistryLogin]:
    """The logins in a credential payload, by location name (``default`` included); empty payload: none."""
    if not payload.strip():
        return {}
    try:
        document = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise AuthenticationFailed("credential payload is not JSON (expected authorized_locations)") from None
    locations = document.get("authorized_locations", {}) if isinstance(document, dict) else None
    if not isinstance(locations, dict):
        raise AuthenticationFailed("credential payload: authorized_locations must be an object")
    logins = {}
    for name, pair in locations.items():
        if not isinstance(pair, str) or ":" not in pair:
            raise AuthenticationFailed(f"credential payload: the login for location {name!r} is not 'user:password'")
        username, password = pair.split(":", 1)
        logins[name] = RegistryLogin(username, password)
    return logins


def login_for(logins: dict[str, RegistryLogin], location: Location, default_location: str) -> RegistryLogin | None:
    """The login a user gave for ``location`` (by name or host); their ``default`` one only when ``location`` is
    the gateway's default location (``DefaultImageLocation``).

    A ``default`` login handed to whatever registry an image names would give a user's password to
    anyone who can get them to pull ``evil.example.com/x``.
    """
    named = logins.get(location.name) or logins.get(location.host)
    if named is not None:
        return named
    return logins.get("default") if location.name == default_location else None


def configured_credential(location: Location) -> Credential | None:
    """The username and password ``imagemanager.json`` gives a location, if it gives both."""
    if location.username and location.password:
        return Credential(source=f"location '{location.name}' in the configuration", username=location.username,
                          password=location.password)
    return None
