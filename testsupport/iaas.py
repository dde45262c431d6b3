"""Loopback emulations of the clouds' credential services (stdlib ``http.server`` in a thread each).

* :class:`EcrApi`: AWS ECR's ``GetAuthorizationToken`` (JSON 1.1); boto3 reaches it through
  ``AWS_ENDPOINT_URL_ECR``. A request must be SigV4-signed (the signature is not checked).
* :class:`GceMetadata`: the GCE metadata server's service account token; ``GCE_METADATA_HOST``.
* :class:`AzureIdentity`: the App Service managed identity endpoint azure-identity calls when
  ``IDENTITY_ENDPOINT`` and ``IDENTITY_HEADER`` are set.
* :class:`AcrRegistry`: ACR's ``/oauth2/exchange`` (AAD token in, refresh token out), and, given
  an upstream registry, everything else passed through to it, so that one host is both, as in ACR.

Each records what it was asked (``requests``) and can be told to refuse (``refusal``).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests

from testsupport.service import LoopbackHttpServer

ECR_TARGET = "AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken"
GCE_TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
_HOP_BY_HOP = {"connection", "transfer-encoding", "keep-alive", "content-length"}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, document: dict[str, Any], content_type: str = "application/json") -> Reply:
        return cls(status, json.dumps(document).encode(), {"Content-Type": content_type})


class _Emulation(LoopbackHttpServer):
    """One HTTP server on a free loopback port; subclasses answer its requests in :meth:`answer`."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.refusal: int | None = None
        """An HTTP status to refuse every credential request with; None: answer them."""
        super().__init__(_Handler)

    def answer(self, request: Request) -> Reply:
        raise NotImplementedError


class EcrApi(_Emulation):
    """ECR's API: ``GetAuthorizationToken`` hands out ``token`` ("user:password"), valid ``ttl`` seconds."""

    def __init__(self, token: str, ttl: int = 43200) -> None:
        super().__init__()
        self.token = token
        self.ttl = ttl
        self.regions: list[str] = []
        """The region in each signed request's credential scope."""

    def answer(self, request: Request) -> Reply:
        if request.method != "POST" or request.headers.get("x-amz-target") != ECR_TARGET:
            return _amz_error(400, "UnknownOperationException", "only GetAuthorizationToken is emulated")
        authorization = request.headers.get("authorization", "")
        if not authorization.startswith("AWS4-HMAC-SHA256 Credential="):
            return _amz_error(403, "MissingAuthenticationTokenException", "the request is not signed")
        # Credential=<key id>/<date>/<region>/ecr/aws4_request
        self.regions.append(authorization.split("Credential=", 1)[1].split("/")[2])
        self.requests.append(request)
        if self.refusal is not None:
            return _amz_error(self.refusal, "UnrecognizedClientException",
                              "The security token included in the request is invalid.")
        data = {"authorizationToken": base64.b64encode(self.token.encode()).decode(),
                "expiresAt": time.time() + self.ttl, "proxyEndpoint": "https://emulated.dkr.ecr.amazonaws.com"}
        return Reply.json(200, {"authorizationData": [data]}, "application/x-amz-json-1.1")


def _amz_error(status: int, kind: str, message: str) -> Reply:
    return Reply.json(status, {"__type": kind, "message": message}, "application/x-amz-json-1.1")


class GceMetadata(_Emulation):
    """The metadata server: the default service account's access token, a new one each time, valid ``ttl``."""

    def __init__(self, ttl: int = 3599) -> None:
        super().__init__()
        self.ttl = ttl
        self.issued: list[str] = []

    def answer(self, request: Request) -> Reply:
        if request.path != GCE_TOKEN_PATH:
            return Reply(404)
        if request.headers.get("metadata-flavor") != "Google":
            return Reply(403, b"Missing Metadata-Flavor: Google header")
        self.requests.append(request)
        if self.refusal is not None:
            return Reply(self.refusal, b"service account unavailable")
        self.issued.append("ya29." + secrets.token_urlsafe(24))
        return Reply.json(200, {"access_token": self.issued[-1], "expires_in": self.ttl, "token_type": "Bearer"})


class AzureIdentity(_Emulation):
    """App Service's managed identity endpoint (``IDENTITY_ENDPOINT``, secret ``header``): AAD tokens."""

    def __init__(self, ttl: int = 3600) -> None:
        super().__init__()
        self.header = secrets.token_hex(8)
        self.ttl = ttl
        self.issued: list[str] = []

    @property
    def environment(self) -> dict[str, str]:
        """The variables that send azure-identity here."""
        return {"IDENTITY_ENDPOINT": f"{self.url}/msi/token", "IDENTITY_HEADER": self.header}

    def answer(self, request: Request) -> Reply:
        if request.path != "/msi/token" or request.headers.get("x-identity-header") != self.header:
            return Reply.json(400, {"error": "invalid_request", "error_description": "unknown endpoint or header"})
        self.requests.append(request)
        if self.refusal is not None:
            return Reply.json(self.refusal, {"error": "invalid_resource",
                                             "error_description": "AADSTS500011: resource principal not found"})
        self.issued.append("aad." + secrets.token_urlsafe(24))
        return Reply.json(200, {"access_token": self.issued[-1], "expires_on": str(int(time.time()) + self.ttl),
                                "resource": request.query.get("resource", ""), "token_type": "Bearer"})


class AcrRegistry(_Emulation):
    """ACR's ``/oauth2/exchange``: an AAD token ``identity`` issued → a refresh token from ``refresh_tokens()``.

    With ``upstream`` (a registry's URL), every other request is passed on to it.
    """

    def __init__(self, identity: AzureIdentity, refresh_tokens: Callable[[], str], upstream: str | None = None) -> None:
        super().__init__()
        self.identity = identity
        self.refresh_tokens = refresh_tokens
        self.upstream = upstream
        self.issued: list[str] = []

    def answer(self, request: Request) -> Reply:
        if request.path != "/oauth2/exchange":
            return self._pass_on(request)
        self.requests.append(request)
        form = {key: values[0] for key, values in parse_qs(request.body.decode()).items()}
        granted = form.get("grant_type") == "access_token" and form.get("service") == self.host \
            and form.get("access_token") in self.identity.issued
        if self.refusal is not None or not granted:
            refused = {"errors": [{"code": "UNAUTHORIZED", "message": "exchange refused"}]}
            return Reply.json(self.refusal or 401, refused)
        self.issued.append(self.refresh_tokens())
        return Reply.json(200, {"refresh_token": self.issued[-1]})

    def _pass_on(self, request: Request) -> Reply:
        if self.upstream is None:
            return Reply(404)
        headers = {name: value for name, value in request.headers.items() if name in ("authorization", "accept")}
        response = requests.request(request.method, self.upstream + request.path, params=request.query,
                                    headers=headers, allow_redirects=False, timeout=30)
        kept = {name: value for name, value in response.headers.items() if name.lower() not in _HOP_BY_HOP}
        if request.method == "HEAD":
            kept["Content-Length"] = response.headers.get("Content-Length", "0")
        return Reply(response.status_code, response.content, kept)


def jwt_shaped(expires: float) -> str:
    """A token shaped like ACR's refresh tokens (an unsigned JWT) that expires at ``expires``."""
    def part(document: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'none'})}.{part({'exp': int(expires), 'jti': secrets.token_hex(8)})}.sig"


class _Handler(BaseHTTPRequestHandler):
    """HTTP glue: every request goes to the emulation's ``answer``."""

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._serve()

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve()

    def do_POST(self) -> None:  # noqa: N802
        self._serve()

    def _serve(self) -> None:
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        request = Request(self.command, url.path, {key: values[0] for key, values in parse_qs(url.query).items()},
                          {name.lower(): value for name, value in self.headers.items()}, body)
        emulation: _Emulation = self.server.owner  # type: ignore[attr-defined]
        reply = emulation.answer(request)
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if "Content-Length" not in reply.headers:
            self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Quiet: the emulations' ``requests`` say what they were asked."""
