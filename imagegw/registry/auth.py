"""Authenticating to a registry: answering its 401 challenges with a credential, and keeping the tokens.

- ``Basic`` challenges get the credential's username and password.
- ``Bearer`` challenges get a token from the named token service (``realm``). It is fetched
  anonymously, with the username and password (GET, Basic), or with an identity token (the OAuth2
  refresh-token grant: POST, GET where the service answers 404). A registry token is sent as it
  is, whatever the challenge.
- Tokens are kept per scope until they expire (``expires_in``, 60 s when the service does not
  say), so a large pull does not ask for one per request; one that expires mid-pull is renewed
  on the registry's next 401.

Refusals name the registry and where the credential came from, never the secret.
"""

from __future__ import annotations

import base64
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import requests

from imagegw.config import Location
from imagegw.errors import RegistryError, RegistryUnauthorized
from imagegw.registry.credentials import Credential

_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')
DEFAULT_TOKEN_LIFETIME = 60
"""Seconds, when the token service does not say: the distribution spec's default."""
_EXPIRY_MARGIN = 10
"""A token this close to expiring is renewed before use rather than sent to be refused."""
CLIENT_ID = "imagegw"


class Sender(Protocol):
    def __call__(self, url: str, subject: str, headers: dict[str, str], *, params: dict[str, str] | None = None,
                 auth: tuple[str, str] | None = None, method: str = "GET",
                 data: dict[str, str] | None = None) -> requests.Response: ...


@dataclass(frozen=True)
class _Authorization:
    header: str
    expires: float | None
    """Epoch; None for Basic credentials, which do not expire."""


class Authenticator:
    """One registry location's credential and the authorizations won with it; shared by download threads."""

    def __init__(self, location: Location, credential: Credential | None, send: Sender,
                 clock: Callable[[], float] = time.time) -> None:
        self._location = location
        self._credential = credential
        self._send = send
        self._clock = clock
        self._identity_token = credential.identity_token if credential else None
        self._by_scope: dict[str, _Authorization] = {}
        self._lock = threading.Lock()

    def cached(self, scope: str) -> str | None:
        """The Authorization header to send first for ``scope``: a live token, or Basic where the location says."""
        with self._lock:
            kept = self._by_scope.get(scope)
        if kept is not None and (kept.expires is None or kept.expires - _EXPIRY_MARGIN > self._clock()):
            return kept.header
        if self._location.auth_method == "basic" and self._has_password():
            return self._basic()
        return None

    def authorize(self, challenge: str, scope: str, subject: str) -> str:
        """The Authorization header the 401 ``challenge`` asks for, remembered for ``scope``."""
        scheme, params = parse_challenge(challenge)
        if self._credential is not None and self._credential.registry_token:
            authorization = _Authorization("Bearer " + self._credential.registry_token, None)
        elif scheme == "bearer":
            authorization = self._token(params, scope, subject)
        elif scheme == "basic":
            if not self._has_password():
                raise RegistryUnauthorized(
                    f"registry {self._location.host} requires credentials to pull {subject}; "
                    f"{self._what_was_tried()}")
            authorization = _Authorization(self._basic(), None)
        else:
            raise RegistryUnauthorized(
                f"registry {self._location.host} refused {subject} and asked for "
                f"{'unsupported authentication ' + repr(scheme) if scheme else 'no known authentication'}")
        with self._lock:
            self._by_scope[scope] = authorization
        return authorization.header

    def refused(self, status: int, subject: str) -> RegistryUnauthorized:
        """The error for a registry that refused ``subject`` even after authorization."""
        if self._credential is None:
            return RegistryUnauthorized(
                f"registry {self._location.host} refused {subject} to anonymous access (HTTP {status}); "
                f"{self._what_was_tried()}")
        if status == 403:
            return RegistryUnauthorized(
                f"registry {self._location.host} denied access to {subject} (HTTP 403, credential from "
                f"{self._credential.source}): check the image name and that the account may pull it")
        return self._failed(f"HTTP {status} for {subject}")

    # -- tokens ---------------------------------------------------------------------------------

    def _token(self, params: dict[str, str], scope: str, subject: str) -> _Authorization:
        realm = params.get("realm")
        if not realm:
            raise RegistryError(f"registry {self._location.host} asked for a token without naming a token service")
        query = {"scope": params.get("scope") or scope} if params.get("scope") or scope else {}
        if params.get("service"):
            query["service"] = params["service"]
        requested = self._clock()
        if self._identity_token:
            response = self._exchange_identity_token(realm, query, subject)
        else:
            basic = (self._credential.username or "", self._credential.password or "") \
                if self._credential is not None and self._has_password() else None
            response = self._send(realm, subject, {}, params=query, auth=basic)
        with response:
            if response.status_code in (400, 401, 403):
                raise self._failed(f"its token service refused it for {subject}")
            if response.status_code >= 300:
                raise RegistryError(f"token service of registry {self._location.host} answered HTTP "
                                    f"{response.status_code} for {subject}")
            answer = json_object(response)
        token = answer.get("token") or answer.get("access_token")
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token service of registry {self._location.host} returned no token for {subject}")
        if isinstance(answer.get("refresh_token"), str) and answer["refresh_token"]:
            self._identity_token = answer["refresh_token"]
        lifetime = answer.get("expires_in")
        if not isinstance(lifetime, (int, float)) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        return _Authorization("Bearer " + token, requested + lifetime)

    def _exchange_identity_token(self, realm: str, query: dict[str, str], subject: str) -> requests.Response:
        """The OAuth2 refresh-token grant; token services that only know the older GET answer 404 to it."""
        assert self._identity_token is not None
        form = {"grant_type": "refresh_token", "refresh_token": self._identity_token, "client_id": CLIENT_ID,
                **query}
        response = self._send(realm, subject, {}, method="POST", data=form)
        if response.status_code != 404:
            return response
        response.close()
        username = self._credential.username if self._credential and self._credential.username else "<token>"
        return self._send(realm, subject, {}, params=query, auth=(username, self._identity_token))

    # -- credentials ----------------------------------------------------------------------------

    def _has_password(self) -> bool:
        return self._credential is not None and self._credential.has_password

    def _basic(self) -> str:
        assert self._credential is not None
        pair = f"{self._credential.username}:{self._credential.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    def _failed(self, what: str) -> RegistryUnauthorized:
        source = self._credential.source if self._credential else "nowhere: anonymous"
        return RegistryUnauthorized(
            f"authentication failed for {self._location.host} (credential from {source}): {what}")

    def _what_was_tried(self) -> str:
        if self._credential is not None:
            return f"the credential from {self._credential.source} is not a username and password"
        return (f"no credential was found for it (a login sent with the request, IMAGEGW_REGISTRY_* variables, "
                f"a cloud provider's with IMAGEGW_ENABLE_IAAS_AUTH, username and password of location "
                f"'{self._location.name}', or a docker config)")


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…"`` → (``bearer``, {realm, service, …})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {key.lower(): quoted.replace('\\"', '"') if quoted else bare
              for key, quoted, bare in _CHALLENGE_PARAM.findall(rest)}
    return scheme.lower(), params


def json_object(response: requests.Response) -> dict[str, Any]:
    """The JSON object a token service answered; ``{}`` for anything else (the caller reports what is missing)."""
    try:
        answer = response.json()
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}
