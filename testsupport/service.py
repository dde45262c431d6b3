"""What the test services (registry, token server, munged, sshd, PostgreSQL) share.

``with`` stops them; start-up polling; and, for those that run as our child process,
:class:`ChildService`: how the child is spawned, stopped, and reported on.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar, Self, TypeVar

from imagegw.processes import log_tail

T = TypeVar("T")


class StoppedOnExit:
    """A started service; leaving a ``with`` block stops it."""

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class LoopbackHttpServer(StoppedOnExit):
    """An HTTP server in a thread of this process, on a free loopback port; its handler finds this object
    as ``self.server.owner``."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], poll_interval: float = 0.05) -> None:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._httpd.owner = self  # type: ignore[attr-defined]
        self.port = int(self._httpd.server_address[1])
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        # A short poll interval: every test stops its servers, and waiting half a second each adds up.
        self._thread: threading.Thread | None = threading.Thread(
            target=self._httpd.serve_forever, args=(poll_interval,), daemon=True,
            name=f"{type(self).__name__}-{self.host}")
        self._thread.start()

    def stop(self) -> None:
        """Shut the server down. Safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            thread.join(timeout=5)


def answer_json(handler: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
    """Send a whole JSON answer, with its Content-Length, from a request handler."""
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def wait_until_answering(answers: Callable[[], bool], process: subprocess.Popen[bytes] | None, timeout: float,
                         interval: float) -> bool:
    """Poll ``answers`` until it is true; False once ``process`` has exited or ``timeout`` s passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers():
            return True
        if process is not None and process.poll() is not None:
            return False
        time.sleep(interval)
    return False


def terminate(process: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGTERM ``process`` if it still runs, SIGKILL it after ``timeout`` s, and reap it."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def retry_port_taken(attempt: Callable[[], T], port_taken: type[Exception], attempts: int) -> T:
    """``attempt()``, again while it raises ``port_taken``; after ``attempts`` tries that error propagates.

    ``free_port()`` only tells which port was free a moment ago: another process may bind
    it before our child does. Each attempt picks a fresh port, so losing that race is retried.
    """
    for _ in range(attempts - 1):
        try:
            return attempt()
        except port_taken:
            pass
    return attempt()


@dataclass(frozen=True)
class StartFailure:
    """Why a child did not come up, for the service's error message; the child is stopped by now."""

    returncode: int | None
    """Its exit code; ``None`` when it still ran, silent, at the deadline."""
    log_tail: str

    def says(self, text: str) -> bool:
        """True when the end of the log holds ``text`` (such as the bind error of a taken port)."""
        return text in self.log_tail[-2000:]

    def state(self, silent: str, *, exited_suffix: str = "") -> str:
        """``exited with code N`` (plus ``exited_suffix``) if the child exited, else ``silent``."""
        if self.returncode is not None:
            return f"exited with code {self.returncode}{exited_suffix}"
        return silent


class ChildService(StoppedOnExit):
    """A service run as our child process, its stdout and stderr appended to ``log_path``.

    The registry, munged, sshd and PostgreSQL all run this way; this class owns the
    process and the open log so that they are spawned, stopped and reported on alike.
    Subclasses extend :meth:`stop` for their own clean-up, and override :meth:`_terminate`
    when the program wants another shutdown than SIGTERM.
    """

    stop_timeout: ClassVar[float]
    """Seconds between SIGTERM and SIGKILL in :meth:`_terminate`."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def _spawn(self, command: Sequence[str], **popen: Any) -> None:
        """Start ``command`` without stdin, logging to :attr:`log_path`, in a session of its own.

        The log is appended to: a retried start keeps the earlier attempts' lines. The session
        keeps a Ctrl-C at the terminal from reaching the child, and lets ``killpg`` reach
        whatever it forks. ``popen`` adds what the service needs (``cwd``, ``env``, ``user``...).
        """
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        try:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **popen,
            )
        except BaseException:
            log_file.close()
            raise
        self._log_file = log_file

    def _wait_answering(self, answers: Callable[[], bool], timeout: float, interval: float, *,
                        stop: Callable[[], None] | None = None) -> StartFailure | None:
        """Poll ``answers``: ``None`` once it is true.

        When the child exits first or ``timeout`` s pass, stop it (with ``stop``, by default
        :meth:`stop`) and return its exit code and the tail of its log, read once it is stopped.
        """
        if wait_until_answering(answers, self._process, timeout, interval):
            return None
        returncode = self._process.poll() if self._process is not None else None
        (stop or self.stop)()
        return StartFailure(returncode, self.log_tail())

    @property
    def running(self) -> bool:
        """True while the child is alive."""
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """Stop the child and close its log. Idempotent; the log file stays."""
        process, self._process = self._process, None
        if process is not None:
            self._terminate(process)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM, SIGKILL after :attr:`stop_timeout` s, and reap."""
        terminate(process, self.stop_timeout)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the child's log."""
        return log_tail(self.log_path, lines)
