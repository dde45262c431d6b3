"""Run a throw-away PostgreSQL (Debian ``postgresql`` 15) on a loopback port for tests and demos.

It is the production database of a Prefect server (SQLite, the embedded default, struggles
with concurrent runs), so the tests point ``prefect server start`` at one of these.

Each server is a fresh cluster: ``initdb`` into a data directory of its own, then ``postgres``
in the foreground as our child (so that :meth:`RunningPostgres.stop` can wait for it),
listening on a free port of 127.0.0.1 and on a Unix socket in a private directory. It never
touches the system's clusters (``/etc/postgresql``, ``/var/lib/postgresql``) or their service.
Once it answers, a login role and a database, both named ``prefect``, are created; the role
owns the database and logs in over TCP with a random password (``scram-sha-256``), which is
what an operator's Prefect server does. The superuser ``postgres`` is reachable only over the
private socket (``trust``), for :meth:`RunningPostgres.query`.

PostgreSQL refuses to run as root. Run as root, the server programs run as the ``postgres``
user the Debian package creates; pytest's ``/tmp/pytest-of-USER`` is 0700 and unreachable to
it, so the data and socket directories live in a fresh 0755 directory directly under ``/tmp``
(owned by that user, removed by :meth:`RunningPostgres.stop`). The log and ``initdb``'s output
stay in the given work directory, written through file descriptors we open.

The server runs with PostgreSQL's default durability (``fsync`` on): turning it off bought
nothing measurable here (Prefect's migrations are CPU-bound), and the tests then see what an
operator's server does.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from imagegw.processes import free_port, log_tail
from testsupport.service import ChildService, retry_port_taken

INSTALL_HINT = "apt-get install postgresql"
INSTALL_ROOT = Path("/usr/lib/postgresql")
"""Debian installs each major version's programs in ``/usr/lib/postgresql/VERSION/bin``, off PATH."""
SERVER_USER = "postgres"
"""The system user the server runs as when we are root (created by Debian's ``postgresql-common``)."""
SUPERUSER = "postgres"
DATABASE = "prefect"
USER = "prefect"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
INITDB_TIMEOUT = 120.0
QUERY_TIMEOUT = 30.0
_BIND_ATTEMPTS = 3
_DATA_PARENT = "/tmp"
"""Sticky and world-searchable on every Linux; ``$TMPDIR`` may be neither."""


class PostgresStartError(RuntimeError):
    """PostgreSQL is not installed or did not come up; the message carries its log tail."""


class PostgresQueryError(RuntimeError):
    """``psql`` failed; the message carries its error output."""


def find_bindir() -> Path:
    """The ``bin`` directory of the newest installed PostgreSQL, or raise with the install hint."""
    candidates = []
    for bindir in INSTALL_ROOT.glob("*/bin"):
        if (bindir / "postgres").is_file() and (bindir / "initdb").is_file() and (bindir / "psql").is_file():
            version = tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name))
            candidates.append((version, bindir))
    if not candidates:
        raise PostgresStartError(f"no PostgreSQL server in {INSTALL_ROOT}/*/bin: {INSTALL_HINT}")
    return max(candidates)[1]


def postgres_installed() -> bool:
    """True when the PostgreSQL server programs are installed (the fixture skips otherwise)."""
    try:
        find_bindir()
    except PostgresStartError:
        return False
    return True


@dataclass(frozen=True)
class _ServerUser:
    """Who the server programs run as: ourselves, or ``postgres`` when we are root."""

    uid: int
    gid: int
    name: str

    @classmethod
    def choose(cls) -> _ServerUser:
        if os.geteuid() != 0:
            entry = pwd.getpwuid(os.geteuid())
            return cls(entry.pw_uid, os.getegid(), entry.pw_name)
        try:
            entry = pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise PostgresStartError(
                f"PostgreSQL refuses to run as root and there is no {SERVER_USER!r} user to run it as: {INSTALL_HINT}"
            ) from None
        return cls(entry.pw_uid, entry.pw_gid, entry.pw_name)

    @property
    def is_us(self) -> bool:
        return self.uid == os.geteuid()

    def popen_arguments(self) -> dict[str, object]:
        """What ``subprocess`` needs to run a program as this user (nothing when it is us)."""
        if self.is_us:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def _clean_env() -> dict[str, str]:
    """The current environment without ``PG*`` variables, which libpq and the server programs read."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


class RunningPostgres(ChildService):
    """A ``postgres`` process serving a fresh cluster with a ``prefect`` database.

    Attributes:
        url: SQLAlchemy URL for Prefect's ``PREFECT_SERVER_DATABASE_CONNECTION_URL``,
            ``postgresql+asyncpg://prefect:PASSWORD@127.0.0.1:PORT/prefect``.
        dsn: the same as a libpq URL (``postgresql://...``), for ``psql`` and other clients.
        host, port, database, user, password: the parts of :attr:`url`.
        socket_dir: the Unix socket directory (the superuser logs in there without a password).
        data_dir: the cluster's data directory (under ``/tmp``, removed by :meth:`stop`).
        workdir: holds postgres.log and initdb.log.
    """

    stop_timeout = STOP_TIMEOUT

    def __init__(self, *, workdir: Path, bindir: Path, base_dir: Path, port: int, password: str) -> None:
        super().__init__(workdir / "postgres.log")
        self.workdir = workdir
        self.bindir = bindir
        self.data_dir = base_dir / "data"
        self.socket_dir = base_dir / "socket"
        self.host = "127.0.0.1"
        self.port = port
        self.database = DATABASE
        self.user = USER
        self.password = password
        self._base_dir: Path | None = base_dir

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    @classmethod
    def start(cls, workdir: Path) -> RunningPostgres:
        """Create a cluster, start it on a free loopback port, create the ``prefect`` role and database.

        Raises :class:`PostgresStartError` with the log tail when ``initdb`` fails or the server
        does not answer within ~30 s, or with the install hint when PostgreSQL is not installed.
        """
        bindir = find_bindir()
        server_user = _ServerUser.choose()
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        base_dir = Path(tempfile.mkdtemp(prefix="postgres-", dir=_DATA_PARENT))
        try:
            base_dir.chmod(0o755)
            (base_dir / "socket").mkdir(mode=0o700)
            for path in (base_dir, base_dir / "socket"):
                os.chown(path, server_user.uid, server_user.gid)
            _initdb(bindir, server_user, base_dir, workdir / "initdb.log")
        except BaseException:
            shutil.rmtree(base_dir, ignore_errors=True)
            raise
        try:
            return retry_port_taken(
                lambda: cls._start_once(workdir, bindir, server_user, base_dir), _PortTaken, _BIND_ATTEMPTS
            )
        except _PortTaken:
            shutil.rmtree(base_dir, ignore_errors=True)
            raise

    @classmethod
    def _start_once(cls, workdir: Path, bindir: Path, server_user: _ServerUser, base_dir: Path) -> RunningPostgres:
        """One start attempt on a fresh port; raises :class:`_PortTaken` on a bind race."""
        port = free_port()
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(base_dir / "socket"),
            "logging_collector": "off",  # log to stderr, which is postgres.log
        }
        command = [str(bindir / "postgres"), "-D", str(base_dir / "data"), "-p", str(port)]
        for name, value in settings.items():
            command += ["-c", f"{name}={value}"]
        running = cls(workdir=workdir, bindir=bindir, base_dir=base_dir, port=port, password=secrets.token_hex(16))
        running._spawn(command, cwd=base_dir, env=_clean_env(), **server_user.popen_arguments())
        running._wait_ready()
        try:
            running._create_database()
        except PostgresQueryError as exc:
            running.stop()
            raise PostgresStartError(f"could not create the {DATABASE} database: {exc}") from None
        return running

    def _wait_ready(self) -> None:
        """Poll with ``pg_isready`` on our socket until the server accepts connections, exits, or time runs out.

        The socket, in a directory of ours, tells that it is our server that answers.
        """
        # Stop only the server at first: a retry on another port reuses the cluster.
        failure = self._wait_answering(self._accepts_connections, START_TIMEOUT, 0.05, stop=super().stop)
        if failure is None:
            return
        if failure.says("Address already in use"):
            raise _PortTaken(f"port {self.port} was taken:\n{failure.log_tail}")
        self.stop()
        state = failure.state(f"did not accept connections within {START_TIMEOUT:.0f} s")
        raise PostgresStartError(
            f"postgres on {self.host}:{self.port} {state} (data {self.data_dir}); "
            f"last lines of {self.log_path}:\n{failure.log_tail}"
        )

    def _accepts_connections(self) -> bool:
        result = subprocess.run(
            [str(self.bindir / "pg_isready"), "-q", "-h", str(self.socket_dir), "-p", str(self.port),
             "-U", SUPERUSER, "-d", "postgres", "-t", "1"],
            stdin=subprocess.DEVNULL, capture_output=True, env=_clean_env(), check=False,
        )
        return result.returncode == 0

    def _create_database(self) -> None:
        """The ``prefect`` login role with its password, and the ``prefect`` database it owns.

        Owning the database lets Prefect's migrations ``CREATE EXTENSION pg_trgm`` (a trusted
        extension since PostgreSQL 13) without being a superuser. The script goes through stdin,
        keeping the password off command lines.
        """
        self.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{self.password}';\n"
                  f"CREATE DATABASE {DATABASE} OWNER {USER};\n", database="postgres")

    def psql(self, script: str, *, database: str = DATABASE) -> str:
        """Run an SQL script as the superuser over the private socket; returns psql's unaligned output."""
        if self._process is None:
            raise PostgresQueryError("the server is stopped")
        result = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.socket_dir), "-p", str(self.port), "-U", SUPERUSER, "-d", database, "-f", "-"],
            input=script.encode(), capture_output=True, env=_clean_env(), timeout=QUERY_TIMEOUT, check=False,
        )
        if result.returncode != 0:
            raise PostgresQueryError(
                f"psql exited with {result.returncode}: {result.stderr.decode(errors='replace').strip()}"
            )
        return result.stdout.decode(errors="replace")

    def query(self, sql: str, *, database: str = DATABASE) -> list[list[str]]:
        """The rows of one query as lists of text fields (``NULL`` is the empty string)."""
        return [line.split("\t") for line in self.psql(sql, database=database).splitlines() if line]

    def _terminate(self, process: subprocess.Popen[bytes]) -> None:
        """Fast shutdown (SIGINT: disconnect clients, checkpoint), then SIGKILL to the whole process group."""
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                pass
        # Backends outlive a killed postmaster for a moment; they share its session.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        process.wait()

    def stop(self) -> None:
        """Stop the server and remove its data and socket directories. Idempotent.

        The work directory (postgres.log, initdb.log) is left in place.
        """
        super().stop()
        if self._base_dir is not None:
            shutil.rmtree(self._base_dir, ignore_errors=True)
            self._base_dir = None

    def __repr__(self) -> str:
        return f"<RunningPostgres {self.host}:{self.port}/{self.database} running={self.running}>"


class _PortTaken(PostgresStartError):
    """The chosen port was grabbed by someone else before postgres bound it."""


def _initdb(bindir: Path, server_user: _ServerUser, base_dir: Path, log_path: Path) -> None:
    """Create the cluster in ``base_dir/data``: UTF-8, C locale, trust on the socket, scram-sha-256 over TCP."""
    with open(log_path, "ab") as log_file:
        try:
            result = subprocess.run(
                [str(bindir / "initdb"), "-D", str(base_dir / "data"), "-U", SUPERUSER,
                 "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C",
                 "--no-sync", "--no-instructions"],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, cwd=base_dir,
                env=_clean_env(), timeout=INITDB_TIMEOUT, check=False,
                **server_user.popen_arguments(),  # type: ignore[call-overload]
            )
        except subprocess.TimeoutExpired:
            raise PostgresStartError(
                f"initdb did not finish within {INITDB_TIMEOUT:.0f} s; last lines of {log_path}:\n"
                f"{log_tail(log_path, 30)}"
            ) from None
    if result.returncode != 0:
        raise PostgresStartError(
            f"initdb (as {server_user.name}) exited with {result.returncode}; last lines of {log_path}:\n"
            f"{log_tail(log_path, 30)}"
        )
