"""Run a private munged (Debian ``munge`` 0.5.15) for tests and demos.

Each daemon has its own key, so credentials from one are forged to another, and
its own replay cache. It never touches the system's munged: the key, pid, seed and
log files live in the given work directory.

munged refuses a socket whose directory, or any directory above it, is not
searchable by everyone (``o+x``); pytest's ``/tmp/pytest-of-USER`` is 0700. So the
socket gets a fresh 0755 directory directly under ``/tmp`` (which also keeps its
path under the 108-byte limit), removed by :meth:`RunningMunged.stop`. No ``--force``.

munged runs in the foreground (``-F``) as our child, so that :meth:`stop` can wait for
it; in that mode it logs to stderr, which goes to ``munged.log`` in the work directory.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from testsupport.service import ChildService

INSTALL_HINT = "apt-get install munge"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
"""munged and mungekey live in sbin, which a non-root PATH may lack."""
_SOCKET_PARENT = "/tmp"
"""Sticky and world-searchable on every Linux; ``$TMPDIR`` may be neither."""


class MungedStartError(RuntimeError):
    """munged is not installed or did not come up; the message carries its log tail."""


class MungeMintError(RuntimeError):
    """``munge`` refused to mint a credential (e.g. ``-U`` without root)."""


def find_binary(name: str) -> str:
    """Return the path of a MUNGE program or raise with the install hint."""
    path = shutil.which(name, path=_SEARCH_PATH)
    if path is None:
        raise MungedStartError(f"{name} not found on PATH or in /usr/sbin: {INSTALL_HINT}")
    return path


def _answers(socket_path: str) -> bool:
    """True when something accepts connections on the Unix socket.

    munged logs each probe as an "incomplete message header": harmless.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(socket_path)
        except OSError:
            return False
        return True


class RunningMunged(ChildService):
    """A munged process with a private key and socket.

    Attributes:
        socket_path: the Unix socket clients pass as ``-S`` / ``socket_path``.
        workdir: holds munge.key, munged.pid, munged.seed and munged.log.
    """

    stop_timeout = STOP_TIMEOUT

    def __init__(self, *, workdir: Path, socket_dir: Path) -> None:
        super().__init__(workdir / "munged.log")
        self.workdir = workdir
        self.socket_path = str(socket_dir / "munge.sock")
        self._socket_dir: Path | None = socket_dir

    @classmethod
    def start(cls, workdir: Path) -> RunningMunged:
        """Create a key in ``workdir``, start munged on it, and wait until its socket answers.

        Raises :class:`MungedStartError` with the log tail when munged does not answer
        within ~10 s, or with the install hint when MUNGE is not installed.
        """
        munged = find_binary("munged")
        mungekey = find_binary("mungekey")
        find_binary("munge")  # mint() needs it: fail now rather than in the middle of a test
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        key = workdir / "munge.key"
        if not key.exists():
            _run_mungekey(mungekey, key)
        socket_dir = Path(tempfile.mkdtemp(prefix="munged-", dir=_SOCKET_PARENT))
        socket_dir.chmod(0o755)
        running = cls(workdir=workdir, socket_dir=socket_dir)
        running._launch(munged)
        return running

    def _launch(self, munged: str) -> None:
        self._spawn([
            munged,
            "--foreground",
            f"--socket={self.socket_path}",
            f"--key-file={self.workdir / 'munge.key'}",
            f"--pid-file={self.workdir / 'munged.pid'}",
            f"--seed-file={self.workdir / 'munged.seed'}",
        ])
        self._wait_ready()

    def interrupt(self) -> None:
        """Stop munged but keep its socket's place and its key, as when a site restarts the daemon."""
        super().stop()

    def resume(self) -> None:
        """Start munged again after :meth:`interrupt`, on the same socket with the same key."""
        self._launch(find_binary("munged"))

    def _wait_ready(self) -> None:
        """Poll the socket until it answers, munged exits, or time runs out."""
        failure = self._wait_answering(lambda: _answers(self.socket_path), START_TIMEOUT, 0.02)
        if failure is None:
            return
        state = failure.state(f"did not answer within {START_TIMEOUT:.0f} s")
        raise MungedStartError(
            f"munged on {self.socket_path} {state}; last lines of {self.log_path}:\n{failure.log_tail}"
        )

    def mint(
        self,
        uid: int = 0,
        gid: int = 0,
        payload: bytes = b"",
        ttl: int | None = None,
        *,
        restrict_uid: int | None = None,
    ) -> str:
        """Mint a ``MUNGE:...`` credential as ``uid``/``gid`` (needs root) carrying ``payload``.

        ``restrict_uid`` allows only that uid to decode it (``munge -u``).
        """
        command = [find_binary("munge"), "-S", self.socket_path, "-U", str(uid), "-G", str(gid)]
        if ttl is not None:
            command += ["-t", str(ttl)]
        if restrict_uid is not None:
            command += ["-u", str(restrict_uid)]
        result = subprocess.run(command, input=payload, capture_output=True, check=False)
        if result.returncode != 0:
            # stderr is munge's own message; it never echoes the payload.
            raise MungeMintError(
                f"munge exited with {result.returncode}: {result.stderr.decode(errors='replace').strip()}"
            )
        return result.stdout.decode("ascii").strip()

    def stop(self) -> None:
        """Stop munged (SIGTERM, then SIGKILL after 5 s) and remove its socket directory. Idempotent."""
        super().stop()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def __repr__(self) -> str:
        return f"<RunningMunged {self.socket_path} running={self.running}>"


def _run_mungekey(mungekey: str, key: Path) -> None:
    """Create a fresh 1024-bit key (mungekey writes it 0600, as munged demands)."""
    result = subprocess.run(
        [mungekey, "--create", f"--keyfile={key}", "--bits=1024"], capture_output=True, check=False
    )
    if result.returncode != 0:
        raise MungedStartError(
            f"mungekey could not create {key}: {result.stderr.decode(errors='replace').strip()}"
        )
