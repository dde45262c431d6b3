"""A loopback TCP relay that slows down what a server sends, so a test can act while a download is under way.

It relays bytes unchanged (the client talks to the real server through it); only the pace of the
server's replies is limited, per connection, to :attr:`ThrottlingProxy.rate` bytes a second.
"""

from __future__ import annotations

import socket
import threading
import time

from testsupport.service import StoppedOnExit

_PIECE = 16 * 1024


class ThrottlingProxy(StoppedOnExit):
    """Listens on 127.0.0.1 and relays each connection to ``upstream`` (``host:port``).

    Attributes:
        host: ``127.0.0.1:PORT``, what clients connect to.
        url: ``http://127.0.0.1:PORT``.
        rate: bytes a second each reply is held to; ``None`` relays at full speed. May be changed
            at any time, and applies to connections already open.
    """

    def __init__(self, upstream: str, rate: int | None) -> None:
        upstream_host, _, upstream_port = upstream.rpartition(":")
        self._upstream = (upstream_host, int(upstream_port))
        self.rate = rate
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self.url = f"http://{self.host}"
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name=f"proxy {self.host}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # the listener was closed: stopped
                return
            try:
                server = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, server))
            threading.Thread(target=self._relay, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._relay, args=(server, client, True), daemon=True).start()

    def _relay(self, source: socket.socket, sink: socket.socket, throttled: bool) -> None:
        try:
            while data := source.recv(_PIECE):
                sink.sendall(data)
                rate = self.rate
                if throttled and rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass  # either side went away: the connection is over
        finally:
            # One side ended: end the other direction too, as a plain connection would.
            for end in (source, sink):
                self._close(end)

    def _close(self, end: socket.socket) -> None:
        with self._lock:
            self._open.discard(end)
        try:
            end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        end.close()

    def stop(self) -> None:
        """Stop listening and cut every open connection."""
        self._listener.close()
        with self._lock:
            ends = list(self._open)
        for end in ends:
            self._close(end)
