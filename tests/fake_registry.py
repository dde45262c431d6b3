"""A scriptable fake registry on 127.0.0.1, for client behaviour the real registry cannot show."""

from __future__ import annotations

import gzip
import hashlib
import json
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from imagegw.config import Location
from imagegw.registry.client import (
    OCI_MANIFEST,
    RegistryClient,
)
from imagegw.registry.reference import ImageRef
from testsupport.images import LayerBuilder
from testsupport.registry import RunningRegistry

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

# --------------------------------------------------------------------------- a scriptable registry


@dataclass
class Seen:
    """One request the fake server received."""

    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    method: str = "GET"


Reply = tuple[int, dict[str, str], bytes]


def json_reply(status: int, document: Any, headers: dict[str, str] | None = None) -> Reply:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(document).encode()


def registry_error(status: int, code: str, message: str) -> Reply:
    return json_reply(status, {"errors": [{"code": code, "message": message}]})


@dataclass
class FakeRegistry:
    """A loopback HTTP server answering GETs from ``routes`` (path → reply function) and recording them."""

    routes: dict[str, Callable[[Seen], Reply]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    tls: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                fake._answer(self)

            def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
                fake._answer(self)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if self.tls:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self.host = f"127.0.0.1:{self._server.server_address[1]}"
        self.url = f"{'https' if self.tls else 'http'}://{self.host}"
        threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True).start()

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        seen = Seen(parts.path, parse_qs(parts.query), {k.lower(): v for k, v in handler.headers.items()},
                    handler.command)
        with self._lock:
            self.seen.append(seen)
        route = self.routes.get(parts.path)
        status, headers, body = route(seen) if route else registry_error(404, "NOT_FOUND", "no such route")
        headers = {"Content-Length": str(len(body)), **headers}
        try:
            handler.send_response(status)
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            return  # the client gave up, as the timeout test wants it to
        # A reply shorter than its Content-Length simulates a connection dropped mid-transfer.
        if handler.command != "HEAD" and len(body) < int(headers["Content-Length"]):
            handler.close_connection = True

    def paths(self, prefix: str = "") -> list[str]:
        with self._lock:
            return [seen.path for seen in self.seen if seen.path.startswith(prefix)]

    def serve(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.routes[path] = lambda seen: (200, dict(headers or {}), body)

    def blob(self, repository: str, data: bytes) -> str:
        digest = sha256(data)
        self.serve(f"/v2/{repository}/blobs/{digest}", data, {"Content-Type": "application/octet-stream"})
        return digest

    def manifest(self, repository: str, tags: list[str], document: dict[str, Any] | bytes, media_type: str) -> str:
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        digest = sha256(body)
        for reference in [*tags, digest]:
            self.serve(f"/v2/{repository}/manifests/{reference}", body,
                       {"Content-Type": media_type, "Docker-Content-Digest": digest})
        return digest

    def image(self, repository: str, tag: str | None, tars: list[bytes], *, architecture: str = "amd64",
              variant: str | None = None, media_type: str = OCI_MANIFEST) -> FakeImage:
        """Serve an image of gzip layers; returns what a client should resolve it to."""
        blobs = [gzip.compress(tar, mtime=0) for tar in tars]
        diff_ids = [sha256(tar) for tar in tars]
        config = {"architecture": architecture, "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids},
                  "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}}
        if variant:
            config["variant"] = variant
        config_bytes = json.dumps(config).encode()
        layers = [{"mediaType": GZIP_LAYER, "digest": self.blob(repository, blob), "size": len(blob)}
                  for blob in blobs]
        manifest = {"schemaVersion": 2, "mediaType": media_type, "layers": layers,
                    "config": {"mediaType": OCI_CONFIG, "digest": self.blob(repository, config_bytes),
                               "size": len(config_bytes)}}
        digest = self.manifest(repository, [tag] if tag else [], manifest, media_type)
        return FakeImage(digest, media_type, config, blobs, diff_ids, manifest)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class FakeImage:
    digest: str
    media_type: str
    config: dict[str, Any]
    blobs: list[bytes]
    diff_ids: list[str]
    manifest: dict[str, Any]

    def index_entry(self, os_name: str = "linux", architecture: str = "amd64", variant: str | None = None,
                    **extra: Any) -> dict[str, Any]:
        platform = {"os": os_name, "architecture": architecture, **({"variant": variant} if variant else {})}
        return {"mediaType": self.media_type, "digest": self.digest,
                "size": len(json.dumps(self.manifest)), "platform": platform, **extra}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_of(name: str, data: bytes) -> bytes:
    return LayerBuilder().file(name, data).tar()


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    server = FakeRegistry()
    yield server
    server.stop()


def location_of(server: FakeRegistry | RunningRegistry, **kwargs: Any) -> Location:
    return Location(name="test", url=server.url, **kwargs)


def client_for(server: FakeRegistry | RunningRegistry, **kwargs: Any) -> RegistryClient:
    return RegistryClient(location_of(server, **kwargs), timeout=5)


def ref_to(server: FakeRegistry | RunningRegistry, repository: str, tag: str | None = "1.0",
           digest: str | None = None, **kwargs: Any) -> ImageRef:
    return ImageRef(location_of(server, **kwargs), repository, tag, digest)

