"""A loopback HTTP proxy in front of a real registry that can fail on purpose: answer 5xx, cut a blob short,
or stall in the middle of one.

Requests are passed to the registry and its answers streamed back unchanged, except while a fault is
armed: ``failures`` more requests are answered ``failure_status``; ``cut_blobs_after`` bytes of each blob
are sent with the full Content-Length, and then the connection is closed; ``stalls`` more blobs stop
after ``stall_blobs_after`` bytes and send nothing more, their connection held open (as a registry or
its blob store that hangs) until the proxy stops.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler
from typing import Any

import requests

from testsupport.service import LoopbackHttpServer, answer_json

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}


class FaultyProxy(LoopbackHttpServer):
    """Relays to ``upstream`` (a registry's URL); see the module for the faults it can be told to make."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.failures = 0
        self.failure_status = 503
        self.cut_blobs_after: int | None = None
        self.stalls = 0
        self.stall_blobs_after = 0
        self.stalled = 0
        """Blobs stalled so far."""
        self.seen: list[str] = []
        self._stopping = threading.Event()
        self._counting = threading.Lock()  # blobs are fetched in parallel
        super().__init__(_Relay)

    def stop(self) -> None:
        self._stopping.set()  # releases the stalled connections, so their threads end
        super().stop()

    def _take_stall(self) -> bool:
        """Whether the blob being sent is one to stall (counting it down)."""
        with self._counting:
            if self.stalls <= 0:
                return False
            self.stalls -= 1
            self.stalled += 1
            return True


class _Relay(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._relay()

    def do_HEAD(self) -> None:  # noqa: N802
        self._relay()

    def _relay(self) -> None:
        proxy: FaultyProxy = self.server.owner  # type: ignore[attr-defined]
        proxy.seen.append(f"{self.command} {self.path}")
        if proxy.failures > 0:
            proxy.failures -= 1
            answer_json(self, proxy.failure_status, b'{"errors": [{"code": "UNAVAILABLE", "message": "injected"}]}')
            return
        headers = {name: value for name, value in self.headers.items() if name.lower() != "host"}
        with requests.request(self.command, proxy.upstream + self.path, headers=headers, stream=True,
                              allow_redirects=False, timeout=30) as answer:
            self.send_response(answer.status_code)
            for name, value in answer.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    self.send_header(name, value)
            self.end_headers()
            if self.command == "HEAD":
                return
            blob = "/blobs/" in self.path
            cut = proxy.cut_blobs_after if blob else None
            stall = proxy.stall_blobs_after if blob else None
            sent = 0
            for chunk in answer.raw.stream(64 * 1024, decode_content=False):
                if cut is not None and sent + len(chunk) > cut:
                    self.wfile.write(chunk[:cut - sent])
                    self.close_connection = True
                    return
                if stall is not None and sent + len(chunk) > stall and proxy._take_stall():
                    self.wfile.write(chunk[:stall - sent])
                    self.wfile.flush()
                    proxy._stopping.wait()
                    self.close_connection = True
                    return
                self.wfile.write(chunk)
                sent += len(chunk)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass
