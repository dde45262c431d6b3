"""A tiny Docker registry token server (stdlib ``http.server`` in a thread).

``GET /token?service=...&scope=repository:NAME:pull,push`` answers
``{"token": JWT, "access_token": JWT, ...}``. The JWT is ES256-signed and carries
the signing certificate in its ``x5c`` header, so a registry configured with
``rootcertbundle: <cert_path>`` trusts it.

Policy: anonymous requests get ``pull`` on any repository; users authenticated
with HTTP Basic get ``pull``, ``push`` and ``delete`` (and ``registry:catalog:*``);
a wrong password gets 401.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from testsupport.service import LoopbackHttpServer

TOKEN_TTL = 300
ANONYMOUS_ACTIONS = frozenset({"pull"})
USER_ACTIONS = frozenset({"pull", "push", "delete", "*"})


def b64url(data: bytes) -> str:
    """Unpadded base64url, as used in JWTs."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def make_signing_identity(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Generate an EC P-256 key and a self-signed CA certificate for it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def sign_jwt(claims: dict[str, Any], key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> str:
    """Return an ES256 JWT for ``claims`` with the DER ``cert`` in the ``x5c`` header."""
    der = cert.public_bytes(serialization.Encoding.DER)
    header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(der).decode()]}
    signing_input = (
        b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    der_signature = key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der_signature)
    raw_signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return signing_input + "." + b64url(raw_signature)


def parse_scope(scope: str) -> tuple[str, str, set[str]] | None:
    """Split ``type:name:actions`` (the name may itself hold colons); None if malformed."""
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not name:
        return None
    return kind, name, {a for a in actions.split(",") if a}


def grant(scopes: list[str], authenticated: bool) -> list[dict[str, Any]]:
    """The ``access`` claim for the requested scopes under the server's policy."""
    access = []
    for scope in scopes:
        parsed = parse_scope(scope)
        if parsed is None:
            continue
        kind, name, wanted = parsed
        if kind == "repository":
            allowed = USER_ACTIONS if authenticated else ANONYMOUS_ACTIONS
        elif kind == "registry" and name == "catalog" and authenticated:
            allowed = frozenset({"*"})
        else:
            continue
        actions = sorted(wanted & allowed)
        if actions:
            access.append({"type": kind, "name": name, "actions": actions})
    return access


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """Decode an ``Authorization: Basic`` header; None if absent or not Basic."""
    if not header or not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


@dataclass(frozen=True)
class _Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]


class TokenServer(LoopbackHttpServer):
    """A running token server.

    Attributes:
        realm: token endpoint URL (``http://127.0.0.1:PORT/token``).
        service: expected ``aud`` of the registry.
        issuer: ``iss`` of the tokens.
        cert_path: PEM certificate the registry must trust (``rootcertbundle``).
        users: accepted Basic credentials.
        requests: (user or None, space-joined scopes) of each token issued.
        rejected: (user, space-joined scopes) of each request refused with 401.
        grants: how each token was asked for: ``GET`` (Basic or anonymous) or a POST's grant_type.
        advertised_ttl: the ``expires_in`` the answers give (the tokens themselves live TOKEN_TTL).
    """

    def __init__(
        self,
        workdir: Path,
        users: dict[str, str],
        service: str,
        issuer: str,
    ) -> None:
        self.workdir = workdir
        self.users = dict(users)
        self.service = service
        self.issuer = issuer
        self.requests: list[tuple[str | None, str]] = []
        self.rejected: list[tuple[str, str]] = []
        self.grants: list[str] = []
        self.advertised_ttl = TOKEN_TTL
        self._refresh_tokens: dict[str, str] = {}
        self._lock = threading.Lock()
        self._key, self._cert = make_signing_identity("imagegw-test-token-issuer")
        self.cert_path = workdir / "token.crt"
        self.key_path = workdir / "token.key"
        self._write_identity()
        super().__init__(_Handler)
        self.realm = f"{self.url}/token"

    @classmethod
    def start(
        cls,
        workdir: Path,
        users: dict[str, str],
        service: str = "test-registry",
        issuer: str = "test-issuer",
    ) -> TokenServer:
        """Generate a signing key/cert in ``workdir`` and serve ``/token`` on a free port."""
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        return cls(workdir, users, service, issuer)

    def _write_identity(self) -> None:
        """Write the certificate (and, for debugging, the key) as PEM files."""
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self.key_path.write_bytes(
            self._key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def issue_token(self, user: str | None, scopes: list[str], *, ttl: int = TOKEN_TTL) -> str:
        """Mint a token for ``user`` (None = anonymous) under the server's policy."""
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": self.service,
            "exp": now + ttl,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": grant(scopes, authenticated=user is not None),
        }
        return sign_jwt(claims, self._key, self._cert)

    def issue_refresh_token(self, user: str) -> str:
        """An identity token for ``user``: what ``docker login`` keeps for an OAuth2 token service."""
        token = secrets.token_urlsafe(24)
        with self._lock:
            self._refresh_tokens[token] = user
        return token

    def handle_token_post(self, form: str) -> _Reply:
        """Answer one ``POST /token`` (OAuth2): ``grant_type=refresh_token`` or ``password``."""
        fields = {key: values[0] for key, values in parse_qs(form).items()}
        scopes = [s for s in fields.get("scope", "").split(" ") if s]
        grant_type = fields.get("grant_type", "")
        with self._lock:
            self.grants.append(grant_type)
            if grant_type == "refresh_token":
                user = self._refresh_tokens.get(fields.get("refresh_token", ""))
            elif grant_type == "password":
                expected = self.users.get(fields.get("username", ""))
                user = fields["username"] if expected is not None and hmac.compare_digest(
                    expected.encode(), fields.get("password", "").encode()) else None
            else:
                return _Reply(400, {"error": "unsupported_grant_type"}, {})
        if user is None:
            with self._lock:
                self.rejected.append((fields.get("username", ""), " ".join(scopes)))
            return _Reply(401, {"error": "invalid_grant"}, {})
        body: dict[str, Any] = {"access_token": self.issue_token(user, scopes), "expires_in": self.advertised_ttl,
                                "scope": " ".join(scopes)}
        if grant_type == "password" and fields.get("access_type") == "offline":
            body["refresh_token"] = self.issue_refresh_token(user)
        with self._lock:
            self.requests.append((user, " ".join(scopes)))
        return _Reply(200, body, {})

    def handle_token_request(self, query: str, authorization: str | None) -> _Reply:
        """Answer one ``GET /token`` request (HTTP-independent, for the handler)."""
        params = parse_qs(query)
        scopes = [s for value in params.get("scope", []) for s in value.split(" ") if s]
        scope_text = " ".join(scopes)
        user: str | None = None
        if authorization:
            creds = parse_basic(authorization)
            expected = self.users.get(creds[0]) if creds else None
            if creds is None or expected is None or not hmac.compare_digest(
                expected.encode(), creds[1].encode()
            ):
                with self._lock:
                    self.rejected.append((creds[0] if creds else "", scope_text))
                return _Reply(
                    401,
                    {"errors": [{"code": "UNAUTHORIZED", "message": "invalid username or password"}]},
                    {"WWW-Authenticate": 'Basic realm="test-token-server"'},
                )
            user = creds[0]
        token = self.issue_token(user, scopes)
        with self._lock:
            self.requests.append((user, scope_text))
            self.grants.append("GET")
        issued_at = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"token": token, "access_token": token, "expires_in": self.advertised_ttl, "issued_at": issued_at}
        return _Reply(200, body, {})



class _Handler(BaseHTTPRequestHandler):
    """HTTP glue: routes ``GET /token`` and ``POST /token`` to the TokenServer."""

    server_version = "imagegw-test-token-server/1"

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        url = urlsplit(self.path)
        if url.path != "/token":
            self._send(_Reply(404, {"errors": [{"code": "NOT_FOUND", "message": url.path}]}, {}))
            return
        owner: TokenServer = self.server.owner  # type: ignore[attr-defined]
        self._send(owner.handle_token_request(url.query, self.headers.get("Authorization")))

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        url = urlsplit(self.path)
        form = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        if url.path != "/token":
            self._send(_Reply(404, {"errors": [{"code": "NOT_FOUND", "message": url.path}]}, {}))
            return
        owner: TokenServer = self.server.owner  # type: ignore[attr-defined]
        self._send(owner.handle_token_post(form))

    def _send(self, reply: _Reply) -> None:
        data = json.dumps(reply.body).encode()
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Keep test output quiet; append to tokenserver.log instead of stderr."""
        owner: TokenServer = self.server.owner  # type: ignore[attr-defined]
        with open(owner.workdir / "tokenserver.log", "a") as log:
            log.write(f"{self.address_string()} {format % args}\n")
