"""Registry credentials from the cloud the gateway runs in: AWS ECR, Google's registries and Azure ACR.

Opt-in: ``IMAGEGW_ENABLE_IAAS_AUTH=true``. Which cloud a registry belongs to is told by its host
(patterns as in :mod:`imagegw.hostglob`), or by the location's ``iaas`` key, for a registry reached
through an alias or a private endpoint:

``ecr``
    ``<account>.dkr.ecr[-fips].<region>.amazonaws.com[.cn]``. boto3's ``GetAuthorizationToken`` with
    AWS's own credential chain (``AWS_ACCESS_KEY_ID``, profiles, instance roles…), in the host's region
    (an alias: the configured one, ``AWS_DEFAULT_REGION``). The token is the username and password.
``gcp``
    ``gcr.io``, ``*.gcr.io``, ``<region>-docker.pkg.dev``. The instance's service account token from
    the metadata server (``GCE_METADATA_HOST`` names another, as for Google's own libraries), as
    the password of ``oauth2accesstoken``.
``acr``
    ``<name>.azurecr.io``. An Azure AD token from azure-identity's ``DefaultAzureCredential``
    (service principal variables, workload identity, managed identity, ``az login``), exchanged at
    the registry's ``/oauth2/exchange`` for a refresh token: the identity token.

Each credential is kept until shortly before it expires. The SDKs are optional extras
(``imagegw[ecr]``, ``imagegw[acr]``; ``imagegw[iaas]`` for both), imported only when a registry
needs them, and read their own variables (``AWS_ENDPOINT_URL_ECR``, ``IDENTITY_ENDPOINT``…) from the
process environment. A provider's refusal is :class:`RegistryUnauthorized` naming the provider and
the registry, never a token.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType

import requests

from imagegw.config import Location
from imagegw.errors import ConfigError, RegistryUnauthorized
from imagegw.hostglob import host_matches
from imagegw.registry.auth import json_object
from imagegw.registry.credentials import Credential

ENABLE_VARIABLE = "IMAGEGW_ENABLE_IAAS_AUTH"
_TRUE, _FALSE = ("true", "1"), ("false", "0", "")
_HOSTS = (
    ("*.dkr.ecr.*.amazonaws.com", "ecr"),
    ("*.dkr.ecr-fips.*.amazonaws.com", "ecr"),
    ("*.dkr.ecr.*.amazonaws.com.cn", "ecr"),
    ("gcr.io", "gcp"),
    ("*.gcr.io", "gcp"),
    ("*-docker.pkg.dev", "gcp"),
    ("*.azurecr.io", "acr"),
)
_RENEW_MARGIN = 300
"""Seconds: a credential this close to expiring is fetched afresh, so that the pull it is handed to
can still renew its registry tokens with it."""
_TIMEOUT = 30
GCP_USERNAME = "oauth2accesstoken"
_METADATA_HOST = "metadata.google.internal"
_METADATA_TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
ACR_USERNAME = "00000000-0000-0000-0000-000000000000"
"""What ACR wants as the username beside a refresh token."""
_ARM_SCOPE = "https://management.azure.com/.default"


@dataclass(frozen=True)
class _Kept:
    credential: Credential
    expires: float
    """Epoch seconds."""


class IaasCredentials:
    """Credentials from the cloud providers' own mechanisms, kept until they expire; shared by threads."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._kept: dict[tuple[str, str], _Kept] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> IaasCredentials | None:
        """The source when ``environ`` opts in with ``IMAGEGW_ENABLE_IAAS_AUTH=true``; None otherwise."""
        value = environ.get(ENABLE_VARIABLE, "").strip().lower()
        if value in _FALSE:
            return None
        if value not in _TRUE:
            raise ConfigError(f"{ENABLE_VARIABLE} in the environment: {environ[ENABLE_VARIABLE]!r} must be true "
                              f"or false")
        return cls()

    def credential_for(self, location: Location) -> Credential | None:
        """The cloud's credential for ``location``; None for a registry of no cloud we know."""
        provider = location.iaas or provider_for(location.host)
        if provider is None:
            return None
        key = (provider, location.url)
        with self._lock:
            kept = self._kept.get(key)
        if kept is None or kept.expires - _RENEW_MARGIN <= self._clock():
            kept = _FETCHERS[provider](location, self._clock())
            with self._lock:
                self._kept[key] = kept
        return kept.credential


def provider_for(host: str) -> str | None:
    """``ecr``, ``gcp`` or ``acr`` for a registry host of that cloud; None for any other."""
    return next((provider for pattern, provider in _HOSTS if host_matches(pattern, host)), None)


# -- AWS ECR ------------------------------------------------------------------------------------------


def _ecr(location: Location, now: float) -> _Kept:
    """``GetAuthorizationToken``: base64 ``user:password``, valid until ``expiresAt``."""
    boto3 = _sdk("boto3", "ecr", location)
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client = boto3.Session().client("ecr", region_name=_ecr_region(location.host))
    except BotoCoreError as exc:  # an alias, and no region configured
        raise _refused("AWS ECR", location, str(exc)) from None
    described = f"AWS ECR (region {client.meta.region_name})"
    try:
        data = client.get_authorization_token()["authorizationData"][0]
    except (BotoCoreError, ClientError) as exc:
        raise _refused(described, location, str(exc)) from None
    try:
        username, password = base64.b64decode(data["authorizationToken"]).decode().split(":", 1)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise _refused(described, location, "its authorization token is not base64 'user:password'") from None
    credential = Credential(source=f"IaaS: {described}", username=username, password=password)
    return _Kept(credential, data["expiresAt"].timestamp())


def _ecr_region(host: str) -> str | None:
    """The region an ECR host names (``<account>.dkr.ecr.<region>.amazonaws.com``); None for an alias."""
    return host.lower().split(".")[3] if provider_for(host) == "ecr" else None


# -- Google -------------------------------------------------------------------------------------------


def _gcp(location: Location, now: float) -> _Kept:
    """The default service account's access token, from the metadata server."""
    described = "GCP metadata server"
    # GCE_METADATA_ROOT is the variable's older name, which Google's libraries still read.
    host = os.environ.get("GCE_METADATA_HOST") or os.environ.get("GCE_METADATA_ROOT") or _METADATA_HOST
    try:
        response = requests.get(f"http://{host}{_METADATA_TOKEN_PATH}", headers={"Metadata-Flavor": "Google"},
                                timeout=_TIMEOUT)
    except requests.RequestException as exc:
        raise _refused(described, location, f"{host} is unreachable ({type(exc).__name__})") from None
    with response:
        if response.status_code != 200:
            raise _refused(described, location, f"{host} answered HTTP {response.status_code}")
        answer = json_object(response)
    token, lifetime = answer.get("access_token"), answer.get("expires_in")
    if not isinstance(token, str) or not token or not isinstance(lifetime, int):
        raise _refused(described, location, f"{host} answered without an access token and its expires_in")
    credential = Credential(source=f"IaaS: {described}", username=GCP_USERNAME, password=token)
    return _Kept(credential, now + lifetime)


# -- Azure ACR ----------------------------------------------------------------------------------------


def _acr(location: Location, now: float) -> _Kept:
    """An Azure AD token, exchanged at the registry for an ACR refresh token."""
    identity = _sdk("azure.identity", "acr", location)
    from azure.core.exceptions import AzureError

    try:
        with identity.DefaultAzureCredential() as azure_credential:
            aad_token = azure_credential.get_token(_ARM_SCOPE)
    except AzureError as exc:
        raise _refused("Azure AD", location, exc.message) from None
    refresh_token = _exchange(location, aad_token.token)
    credential = Credential(source=f"IaaS: Azure AD exchanged at {location.host}", username=ACR_USERNAME,
                            identity_token=refresh_token)
    return _Kept(credential, _jwt_expiry(refresh_token) or aad_token.expires_on)


def _exchange(location: Location, aad_token: str) -> str:
    """ACR's refresh token for ``aad_token``, from ``/oauth2/exchange`` at the location's URL."""
    url = f"{location.url}/oauth2/exchange"
    described = f"Azure AD token exchange at {url}"
    form = {"grant_type": "access_token", "service": location.host, "access_token": aad_token}
    try:
        response = requests.post(url, data=form, timeout=_TIMEOUT, verify=location.cacert or True)
    except requests.RequestException as exc:
        raise _refused(described, location, f"unreachable ({type(exc).__name__})") from None
    with response:
        if response.status_code != 200:
            raise _refused(described, location, f"HTTP {response.status_code}")
        refresh_token = json_object(response).get("refresh_token")
    if not isinstance(refresh_token, str) or not refresh_token:
        raise _refused(described, location, "the answer has no refresh_token")
    return refresh_token


def _jwt_expiry(token: str) -> float | None:
    """The ``exp`` of a JWT, unverified (only to know when to fetch another); None if it is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return None
    expiry = claims.get("exp") if isinstance(claims, dict) else None
    return float(expiry) if isinstance(expiry, (int, float)) else None


# -- shared -------------------------------------------------------------------------------------------


_FETCHERS: dict[str, Callable[[Location, float], _Kept]] = {"ecr": _ecr, "gcp": _gcp, "acr": _acr}


def _sdk(module: str, extra: str, location: Location) -> ModuleType:
    """The provider's SDK, imported now so that the gateway runs without the ones it does not need."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"registry {location.host} needs {module} for its cloud credentials "
                          f"({ENABLE_VARIABLE} is on): pip install 'imagegw[{extra}]'") from None


def _refused(provider: str, location: Location, reason: str) -> RegistryUnauthorized:
    return RegistryUnauthorized(f"IaaS: {provider} gave no credential for registry {location.host}: {reason}")
