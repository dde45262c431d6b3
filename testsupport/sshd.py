"""Run a private OpenSSH sshd (Debian ``openssh-server`` 9.2) on a loopback port for tests.

The remote publisher speaks SFTP through paramiko; a real sshd checks what a fake
would not (key types, host-key verification, a dropped connection mid-transfer).
It never touches the system's ssh configuration: the host key, sshd_config,
authorized_keys, pid and log files live in the given work directory, sshd reads
only the config given with ``-f``, and nothing under ``/etc/ssh`` or ``~/.ssh`` is read
or written. The one system path it needs is the privilege-separation directory
``/run/sshd``, which is created (0755, empty) when missing.

sshd runs in the foreground (``-D``) as our child, logging to stderr (``-e``), which
goes to ``sshd.log`` in the work directory. Each connection is served by a child of
that process, in a session of its own, so :meth:`RunningSshd.kill_sessions` finds
connections by parent pid, and :meth:`RunningSshd.stop` kills them before the
listener (sshd leaves sessions running when the listener exits).

Tests run as root and log in as root (``PermitRootLogin prohibit-password``).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from imagegw.processes import free_port
from testsupport.service import ChildService, StoppedOnExit, retry_port_taken

SSHD_BINARY = "/usr/sbin/sshd"
"""Absolute, as sshd demands (it re-executes itself for every connection)."""
INSTALL_HINT = "apt-get install openssh-server"
PRIVSEP_DIR = Path("/run/sshd")
KEY_COMMENT = "imagegw-test"
KEY_KINDS = ("rsa", "ed25519", "ecdsa")
RSA_BITS = 3072
KEY_PASSPHRASE = "correct horse"
"""The passphrase of :attr:`UserKeys.encrypted`."""
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
KILL_TIMEOUT = 5.0
_BIND_ATTEMPTS = 3


class SshdStartError(RuntimeError):
    """sshd or ssh-keygen is missing or sshd did not come up; the message carries the log tail."""


def sshd_installed() -> bool:
    """True when :data:`SSHD_BINARY` exists (the fixtures skip otherwise)."""
    return os.access(SSHD_BINARY, os.X_OK)


def _ssh_keygen() -> str:
    path = shutil.which("ssh-keygen")
    if path is None:
        raise SshdStartError(f"ssh-keygen not found on PATH: {INSTALL_HINT}")
    return path


def generate_user_key(path: Path, kind: str, passphrase: str = "") -> Path:
    """Write an OpenSSH key pair of ``kind`` (rsa: 3072 bits, ed25519, ecdsa) to ``path`` and ``path.pub``.

    Returns ``path``, the private key. Private keys are in OpenSSH format, which is
    what ``ssh-keygen`` writes today and what the publisher must load.
    """
    if kind not in KEY_KINDS:
        raise ValueError(f"key kind {kind!r} is not one of {', '.join(KEY_KINDS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    command = [_ssh_keygen(), "-q", "-t", kind, "-N", passphrase, "-f", str(path), "-C", KEY_COMMENT]
    if kind == "rsa":
        command += ["-b", str(RSA_BITS)]
    result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    if result.returncode != 0:
        raise SshdStartError(
            f"ssh-keygen could not create {path}: {result.stderr.decode(errors='replace').strip()}"
        )
    return path


def public_key_path(private_key: Path) -> Path:
    """Where ssh-keygen put the public half: ``<private>.pub`` (not ``with_suffix``)."""
    return Path(f"{private_key}.pub")


def _public_key_fields(public_key: Path) -> str:
    """``type base64`` of a ``.pub`` file, without its comment."""
    return " ".join(public_key.read_text().split()[:2])


def current_user() -> str:
    """The name of the user the tests run as, which is the user they log in as."""
    return pwd.getpwuid(os.getuid()).pw_name


def dead_address() -> str:
    """``127.0.0.1:PORT`` where nothing listened a moment ago: a host that is down."""
    return f"127.0.0.1:{free_port()}"


def sshd_config(*, port: int, host_key: Path, pid_file: Path, authorized_keys: Path) -> str:
    """The text of an sshd_config for a loopback, key-only, SFTP-capable test server."""
    settings = [
        ("ListenAddress", "127.0.0.1"),
        ("Port", str(port)),
        ("HostKey", f'"{host_key}"'),
        ("PidFile", f'"{pid_file}"'),
        ("AuthorizedKeysFile", f'"{authorized_keys}"'),
        ("PubkeyAuthentication", "yes"),
        ("PasswordAuthentication", "no"),
        ("KbdInteractiveAuthentication", "no"),
        ("PermitRootLogin", "prohibit-password"),
        ("StrictModes", "no"),  # pytest's directories are not root-owned all the way up
        ("UsePAM", "no"),
        ("Subsystem", "sftp internal-sftp"),
        ("LogLevel", "VERBOSE"),
        ("MaxStartups", "200"),  # failover and retry tests open many connections at once
        ("MaxSessions", "100"),
        ("MaxAuthTries", "10"),
        ("LoginGraceTime", "30"),
        ("UseDNS", "no"),
        ("PrintMotd", "no"),
        ("PrintLastLog", "no"),
        ("X11Forwarding", "no"),
    ]
    return "".join(f"{key} {value}\n" for key, value in settings)


def _banner(host: str, port: int) -> bytes:
    """The first bytes the server sends, or b"" when nothing answers."""
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            return sock.recv(256)
    except OSError:
        return b""


def _parents() -> dict[int, int]:
    """pid -> parent pid for every process we can see in /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: fields restart after the last ")".
        parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    return parents


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class RunningSshd(ChildService):
    """An sshd listening on 127.0.0.1 with its own host key and authorized keys.

    Attributes:
        host: ``127.0.0.1``.
        port: the listening port.
        address: ``127.0.0.1:PORT``.
        user: the user to log in as (the current user).
        host_key_public: the server's ed25519 public host key (``.pub``).
        authorized_keys: the authorized_keys file sshd reads.
        workdir: holds the host key, sshd_config, authorized_keys, sshd.pid and sshd.log.
    """

    stop_timeout = STOP_TIMEOUT

    def __init__(self, *, workdir: Path, port: int) -> None:
        super().__init__(workdir / "sshd.log")
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = port
        self.address = f"{self.host}:{port}"
        self.user = current_user()
        self.host_key_public = workdir / "ssh_host_ed25519_key.pub"
        self.authorized_keys = workdir / "authorized_keys"
        self.config_path = workdir / "sshd_config"

    @classmethod
    def start(cls, workdir: Path, authorized_keys: Sequence[Path]) -> RunningSshd:
        """Start sshd in ``workdir`` accepting the given public keys and wait until it sends its banner.

        ``authorized_keys`` are ``.pub`` files (a private key path is taken to mean
        its ``.pub``). Raises :class:`SshdStartError` with the log tail when sshd does
        not answer within ~10 s, or with the install hint when it is not installed.
        """
        if not sshd_installed():
            raise SshdStartError(f"{SSHD_BINARY} not found: {INSTALL_HINT}")
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        host_key = workdir / "ssh_host_ed25519_key"
        if not host_key.exists():
            generate_user_key(host_key, "ed25519")
        lines = []
        for key in authorized_keys:
            key = Path(key)
            public = key if key.suffix == ".pub" else public_key_path(key)
            lines.append(public.read_text().strip() + "\n")
        (workdir / "authorized_keys").write_text("".join(lines))
        _ensure_privsep_dir()
        return retry_port_taken(lambda: cls._start_once(workdir, host_key), _PortTaken, _BIND_ATTEMPTS)

    @classmethod
    def _start_once(cls, workdir: Path, host_key: Path) -> RunningSshd:
        """One start attempt on a fresh port; raises :class:`_PortTaken` on a bind race."""
        port = free_port()
        config_path = workdir / "sshd_config"
        config_path.write_text(
            sshd_config(
                port=port,
                host_key=host_key,
                pid_file=workdir / "sshd.pid",
                authorized_keys=workdir / "authorized_keys",
            )
        )
        running = cls(workdir=workdir, port=port)
        running._spawn([SSHD_BINARY, "-D", "-e", "-f", str(config_path)], cwd=workdir)
        running._wait_ready()
        return running

    def _wait_ready(self) -> None:
        """Poll the port until it sends an SSH banner, sshd exits, or time runs out.

        The banner, not just an open port, tells that it is our sshd that listens.
        """
        answers = lambda: _banner(self.host, self.port).startswith(b"SSH-")  # noqa: E731
        failure = self._wait_answering(answers, START_TIMEOUT, 0.02)
        if failure is None:
            return
        if failure.says("Address already in use"):
            raise _PortTaken(f"port {self.port} was taken:\n{failure.log_tail}")
        state = failure.state(f"did not send an SSH banner within {START_TIMEOUT:.0f} s")
        raise SshdStartError(
            f"sshd on {self.address} {state} (config {self.config_path}); "
            f"last lines of {self.log_path}:\n{failure.log_tail}"
        )

    @property
    def pid(self) -> int | None:
        """The listening sshd's pid, ``None`` once stopped."""
        return self._process.pid if self._process is not None else None

    def host_key_fields(self) -> str:
        """``ssh-ed25519 AAAA...``: the host key as known_hosts and paramiko's ``HostKeys`` write it."""
        return _public_key_fields(self.host_key_public)

    def known_hosts_line(self) -> str:
        """``[127.0.0.1]:PORT ssh-ed25519 AAAA...``: this server's line in an OpenSSH known_hosts file."""
        return f"[{self.host}]:{self.port} {self.host_key_fields()}"

    def write_known_hosts(self, path: Path) -> Path:
        """Write a known_hosts file trusting only this server; returns ``path``."""
        path = Path(path)
        path.write_text(self.known_hosts_line() + "\n")
        return path

    def session_pids(self) -> list[int]:
        """The per-connection children of the listening sshd (pre- and post-authentication)."""
        if self._process is None:
            return []
        listener = self._process.pid
        return sorted(pid for pid, parent in _parents().items() if parent == listener and _alive(pid))

    def kill_sessions(self) -> int:
        """SIGKILL every live connection (its whole process tree) and wait until they are gone.

        Cuts transfers mid-stream: the client sees the TCP connection close without
        an SSH disconnect. The listener keeps accepting new connections. Returns how
        many connections were cut.
        """
        if self._process is None:
            return 0
        parents = _parents()
        sessions = [pid for pid, parent in parents.items() if parent == self._process.pid and _alive(pid)]
        doomed = set(sessions)
        frontier = list(sessions)
        while frontier:  # the privilege-separated child and whatever it runs hold the socket too
            children = [pid for pid, parent in parents.items() if parent in frontier and pid not in doomed]
            doomed.update(children)
            frontier = children
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + KILL_TIMEOUT
        while any(_alive(pid) for pid in doomed) and time.monotonic() < deadline:
            time.sleep(0.01)
        return len(sessions)

    def stop(self) -> None:
        """Cut all connections, stop sshd (SIGTERM, then SIGKILL after 5 s). Idempotent.

        The work directory (host key, log) is left in place.
        """
        self.kill_sessions()
        super().stop()

    def __repr__(self) -> str:
        return f"<RunningSshd {self.address} running={self.running}>"


class _PortTaken(SshdStartError):
    """The chosen port was grabbed by someone else before sshd bound it."""


def _ensure_privsep_dir() -> None:
    """Create ``/run/sshd`` (0755), which sshd insists on even when it is not the system's sshd."""
    if PRIVSEP_DIR.is_dir():
        return
    try:
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        PRIVSEP_DIR.chmod(0o755)
    except OSError as exc:
        raise SshdStartError(f"cannot create sshd's privilege-separation directory {PRIVSEP_DIR}: {exc}") from exc


@dataclass(frozen=True)
class UserKeys:
    """Client key pairs, one per kind the publisher must accept; ``.pub`` next to each.

    Attributes:
        rsa, ed25519, ecdsa: private keys without passphrase.
        encrypted: an ed25519 private key protected by :attr:`passphrase`.
    """

    rsa: Path
    ed25519: Path
    ecdsa: Path
    encrypted: Path
    passphrase: str = KEY_PASSPHRASE

    @classmethod
    def generate(cls, directory: Path) -> UserKeys:
        """Generate the four key pairs in ``directory`` (``id_rsa``, ``id_ed25519``, ...)."""
        directory = Path(directory)
        return cls(
            rsa=generate_user_key(directory / "id_rsa", "rsa"),
            ed25519=generate_user_key(directory / "id_ed25519", "ed25519"),
            ecdsa=generate_user_key(directory / "id_ecdsa", "ecdsa"),
            encrypted=generate_user_key(directory / "id_ed25519_encrypted", "ed25519", KEY_PASSPHRASE),
        )

    @property
    def unencrypted(self) -> dict[str, Path]:
        """``{"rsa": ..., "ed25519": ..., "ecdsa": ...}``: handy for parametrizing."""
        return {"rsa": self.rsa, "ed25519": self.ed25519, "ecdsa": self.ecdsa}

    @property
    def private_keys(self) -> list[Path]:
        """All four private keys, the encrypted one last."""
        return [self.rsa, self.ed25519, self.ecdsa, self.encrypted]


@dataclass
class SshServer(StoppedOnExit):
    """What the ``sshd`` fixtures yield: a running sshd, the keys it accepts, and a known_hosts for it.

    Attributes:
        sshd: the server (``kill_sessions()``, ``stop()``, ``log_tail()``, ...).
        keys: every key in it is authorized.
        known_hosts: an OpenSSH known_hosts file holding only this server's host key.
    """

    sshd: RunningSshd
    keys: UserKeys
    known_hosts: Path
    host: str = field(init=False)
    port: int = field(init=False)
    address: str = field(init=False)
    user: str = field(init=False)

    def __post_init__(self) -> None:
        self.host, self.port, self.address, self.user = (
            self.sshd.host, self.sshd.port, self.sshd.address, self.sshd.user
        )

    @classmethod
    def start(cls, workdir: Path, keys: UserKeys | None = None) -> SshServer:
        """Start an sshd in ``workdir/sshd`` authorizing ``keys`` (generated in ``workdir/keys`` if None)."""
        workdir = Path(workdir)
        if keys is None:
            keys = UserKeys.generate(workdir / "keys")
        sshd = RunningSshd.start(workdir / "sshd", keys.private_keys)
        return cls(sshd=sshd, keys=keys, known_hosts=sshd.write_known_hosts(workdir / "known_hosts"))

    def stop(self) -> None:
        """Stop the sshd (idempotent)."""
        self.sshd.stop()


class RefusingListener(StoppedOnExit):
    """A TCP listener on 127.0.0.1 that is not an SSH server: it closes every connection at once.

    Stands in for a host that answers but cannot serve (a failover test's broken
    first host). With ``banner`` it first sends those bytes, so the client fails on
    the protocol banner instead of on EOF.

    Attributes:
        host, port, address: where it listens (``address`` is ``127.0.0.1:PORT``).
        accepted: connections accepted so far (proof that a client tried this host).
    """

    def __init__(self, banner: bytes = b"") -> None:
        self.banner = banner
        self.accepted = 0
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.05)
        self.host = "127.0.0.1"
        self.port = int(self._socket.getsockname()[1])
        self.address = f"{self.host}:{self.port}"
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"refusing-{self.port}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with connection:
                self.accepted += 1
                if self.banner:
                    try:
                        connection.sendall(self.banner)
                    except OSError:
                        pass

    def stop(self) -> None:
        """Stop accepting and close the socket. Idempotent."""
        self._stopping.set()
        self._thread.join(timeout=5)
        self._socket.close()

    def __repr__(self) -> str:
        return f"<RefusingListener {self.address} accepted={self.accepted}>"


@contextmanager
def refusing_listener(banner: bytes = b"") -> Iterator[RefusingListener]:
    """A :class:`RefusingListener` for the ``with`` block."""
    listener = RefusingListener(banner)
    try:
        yield listener
    finally:
        listener.stop()
