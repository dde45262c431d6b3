"""SecantusDB, the gateway's embedded MongoDB-compatible server, as a test's own child on a fixed port.

The gateway starts its embedded server on a free port and reuses it for the life of the host's state
directory; a test that stops the database under a running pull needs one it can stop and start again
where the gateway's clients look for it, with the records it held.
"""

from __future__ import annotations

import sys
from pathlib import Path

from imagegw.processes import free_port, listening
from testsupport.service import ChildService

START_TIMEOUT = 30.0
"""SecantusDB listens within a second or two; a busy 2-core host may take far longer."""


class SecantusStartError(RuntimeError):
    """The server did not listen; the message carries its log tail."""


class RunningSecantus(ChildService):
    """``python -m secantus`` on a free port of 127.0.0.1, its data (kept across restarts) under ``home``.

    Attributes:
        uri: ``mongodb://127.0.0.1:PORT``, the same before and after :meth:`interrupt` and :meth:`resume`.
    """

    stop_timeout = 10.0

    def __init__(self, home: Path) -> None:
        super().__init__(home / "secantus.log")
        self.home = home
        self.port = free_port()
        self.uri = f"mongodb://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, home: Path) -> RunningSecantus:
        """Start the server and wait until it listens."""
        (home / "data").mkdir(parents=True, exist_ok=True)
        server = cls(home)
        server.resume()
        return server

    def interrupt(self) -> None:
        """Stop the server (SIGTERM, as an operator's restart does), keeping its port's place and its data."""
        self.stop()

    def resume(self) -> None:
        """Start the server (again, after :meth:`interrupt`) on the same port and data."""
        self._spawn([sys.executable, "-m", "secantus", "--host", "127.0.0.1", "--port", str(self.port),
                     "--storage-path", str(self.home / "data")])
        failure = self._wait_answering(lambda: listening("127.0.0.1", self.port), START_TIMEOUT, 0.05)
        if failure is not None:
            state = failure.state(f"did not listen within {START_TIMEOUT:.0f} s")
            raise SecantusStartError(f"SecantusDB on port {self.port} {state}; last lines of {self.log_path}:\n"
                                     f"{failure.log_tail}")
