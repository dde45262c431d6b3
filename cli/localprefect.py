"""Which Prefect server a command of this host uses; the one an ``imagegw pull`` starts when it is given none
and no ``imagegw serve`` runs.

Left to itself, Prefect starts a temporary server when the flow starts: after the command has imported
Prefect and started the database, one after the other; and on a fresh state directory that server first
runs all of Prefect's database migrations. This module starts the same server (Prefect's own command for
it) as the command's first act, so that it imports while the command does, and gives a fresh state
directory a copy of a database already migrated by the same Prefect version: the first one this user's
pulls migrated, kept under the user's cache directory. The figures are in bench/README.md.
"""

from __future__ import annotations

import atexit
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from dataclasses import dataclass
from http.client import HTTPException
from importlib.metadata import version
from pathlib import Path
from urllib.error import HTTPError
from urllib.request import Request, urlopen

from imagegw.config import Settings
from imagegw.errors import ServiceUnavailable
from imagegw.processes import dying_with_this_process, log_tail

SERVED_PREFECT_API = "prefect-api-url"
"""The file under the state directory naming the Prefect API of the ``serve`` running on it, for
``imagegw pull``: a pull through a running server skips starting a temporary one (bench/README.md)."""
START_TIMEOUT = 120.0
"""A fresh database without a template runs the migrations first (~10 s here): room for a busy small host."""
TEMPORARY_SERVER_SPARED = {
    # Automations: the triggers and the actions they take (importing and starting them, 0.7 s of CPU here).
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
    # Streaming events and logs out to websocket subscribers: a server living for one pull has none.
    "PREFECT_SERVER_EVENTS_STREAM_OUT_ENABLED": "false",
    "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "false",
    # Registering Prefect's block types in the database (0.5 s): the pipeline uses no blocks, and
    # `imagegw serve`'s server registers them in the same database when it starts.
    "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
}
"""Prefect settings of the temporary server, unless set in the environment: its start, measured alone, 6.4 → 5.2 s.
The flow run, its task runs, logs and events are recorded as by any server."""
DATABASE_SETTINGS = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")
"""Where an operator points Prefect at another database, whose schema is not the template's business."""


def prepare_prefect_environment(settings: Settings, *, verbose: bool) -> None:
    """Keep Prefect's state under the gateway's state directory unless the operator chose otherwise."""
    os.environ.setdefault("PREFECT_HOME", str(settings.state_dir / "prefect"))
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    # A gateway host is usually offline; telemetry would only time out (and print a notice).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    # A first ephemeral start runs the database migrations, which take long on a small host.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def prefect_server_for_pull(settings: Settings) -> TemporaryPrefectServer | None:
    """Where the pull's flow run reports: PREFECT_API_URL; else the Prefect server of an ``imagegw serve`` on this
    state directory (the run then shows in the gateway's UI); else a temporary server, started here.

    With Prefect already imported (by a program calling ``cli.main.main``), its settings decide, as they were read.
    """
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return None
    served = served_prefect_api(settings)
    if served is not None:
        os.environ["PREFECT_API_URL"] = served
        return None
    server = TemporaryPrefectServer.start(Path(os.environ["PREFECT_HOME"]),
                                          settings.state_dir / "logs" / "prefect-temporary-server.log")
    # Registered before Prefect's own exit handlers, so it runs after them: they deliver the run's last logs.
    atexit.register(server.stop)
    return server


def served_prefect_api(settings: Settings) -> str | None:
    """The Prefect API of the ``imagegw serve`` running on this state directory, if it answers.

    A serve killed outright leaves its file behind, naming a server that died with it (or, later, whatever
    took its port): only a server answering Prefect's health check counts.
    """
    try:
        api_url = (settings.state_dir / SERVED_PREFECT_API).read_text().strip()
    except FileNotFoundError:
        return None
    return api_url if api_url and prefect_healthy(api_url) else None


def record_served_prefect_api(settings: Settings, api_url: str) -> Path:
    """Name the Prefect API ``imagegw serve`` uses in a file under the state directory, written whole or not at all
    (a pull may read it any time); return the file."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    recorded = settings.state_dir / SERVED_PREFECT_API
    partial = recorded.with_name(f"{SERVED_PREFECT_API}.{os.getpid()}")
    partial.write_text(f"{api_url}\n")
    partial.replace(recorded)
    return recorded


def prefect_healthy(api_url: str) -> bool:
    """Whether the Prefect API at ``api_url`` answers its health check."""
    return prefect_answer(f"{api_url}/health") == b"true"


def prefect_wants_csrf_tokens(api_url: str) -> bool:
    """Whether the Prefect server at ``api_url`` wants a CSRF token with every change (its
    ``PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED``): one that does not answers a request for a token with 422.
    Unless that answer comes, it is taken to want them, as Prefect's clients take it."""
    try:
        with urlopen(f"{api_url}/csrf-token?client=imagegw", timeout=2):
            return True
    except HTTPError as refused:
        return refused.code != 422
    except (OSError, HTTPException, ValueError):
        return True


def prefect_answer(url: str, query: bytes | None = None) -> bytes | None:
    """The body of a 200 answer to a GET (a POST of a JSON ``query``) to a Prefect API, or None for anything else."""
    request = Request(url, data=query, headers={"Content-Type": "application/json"} if query else {})
    try:
        with urlopen(request, timeout=2) as answer:
            body: bytes = answer.read()
    except (OSError, HTTPException, ValueError):  # refused, an error status, a timeout, not HTTP, not a URL
        return None
    return body.strip()


@dataclass
class TemporaryPrefectServer:
    """A Prefect API server on loopback for this process's pull, stopped when the process exits."""

    process: subprocess.Popen[bytes]
    api_url: str
    log: Path
    database: Path | None
    """The SQLite database it migrates on its start, to keep as the template; None if it has one already."""

    @classmethod
    def start(cls, home: Path, log: Path) -> TemporaryPrefectServer:
        """Start the server on Prefect's database under ``home``, seeded from the template when there is none."""
        database = None
        spared = dict(TEMPORARY_SERVER_SPARED)
        if not any(os.environ.get(name) for name in DATABASE_SETTINGS):
            database = home / "prefect.db"
            if database.exists() or _seed(database):
                if _migrated_as_template(database):
                    # By this Prefect version's migrations, as the template: checking them is 0.25 s of the start.
                    spared["PREFECT_API_DATABASE_MIGRATE_ON_START"] = "false"
                database = None
        log.parent.mkdir(parents=True, exist_ok=True)
        # The command and flags Prefect's own temporary server (SubprocessASGIServer) runs with: no UI,
        # none of a full server's background services. Of those an ephemeral server still runs, it is spared
        # what one pull has no use for (TEMPORARY_SERVER_SPARED): its start is the longest step of the command.
        environment = {**spared, **os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "0",
                       "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        # Bound here and handed over: a port only chosen here could be taken in the seconds the server
        # spends importing before it binds.
        with socket.create_server(("127.0.0.1", 0)) as listener, open(log, "ab") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                 "--fd", str(listener.fileno()), "--log-level", "error", "--lifespan", "on"],
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env=environment,
                pass_fds=[listener.fileno()], preexec_fn=dying_with_this_process())
            port = listener.getsockname()[1]
        return cls(process, f"http://127.0.0.1:{port}/api", log, database)

    def use(self) -> None:
        """Point this process's Prefect at the server once it answers, unless Prefect's settings name a server.

        Called after Prefect's import: a Prefect profile or ``.env`` naming a server is known only then, and
        wins, as it did before this server existed.
        """
        from prefect.context import refresh_global_settings_context
        from prefect.settings import get_current_settings

        if get_current_settings().api.url:
            self.stop()
            return
        self.wait_until_healthy()
        if self.database is not None:
            _keep_as_template(self.database)
        os.environ["PREFECT_API_URL"] = self.api_url
        refresh_global_settings_context()  # Prefect's settings were read at its import

    def stop(self) -> None:
        """Ask the server to stop, without waiting: it has nothing left to write for this process."""
        if self.process.poll() is None:
            self.process.terminate()

    def wait_until_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not prefect_healthy(self.api_url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                problem = (f"exited with status {self.process.returncode}" if self.process.poll() is not None
                           else f"did not answer within {START_TIMEOUT:.0f} s")
                raise ServiceUnavailable(f"the temporary Prefect server for this pull {problem} (set PREFECT_API_URL "
                                         f"to a running one, or run `imagegw serve`); the end of {self.log}:\n"
                                         f"{log_tail(self.log, 15) or '(no log)'}")
            time.sleep(0.05)


def prepare_template() -> Path | None:
    """Make the template (``template_path``) if this user has none, as a pull on a fresh state directory would, with
    a temporary server of its own: what the first pull of a new host or user would otherwise spend on Prefect's
    migrations (~6 s here). The template made, or None: there was one, or Prefect is set to another database."""
    if template_path().exists() or any(os.environ.get(name) for name in DATABASE_SETTINGS):
        return None
    with tempfile.TemporaryDirectory(prefix="imagegw-prepare-") as home:
        server = TemporaryPrefectServer.start(Path(home), Path(home) / "prefect-server.log")
        try:
            server.wait_until_healthy()
            assert server.database is not None, "no template, so the server migrated a new database"
            _copy_database(server.database, template_path())
        finally:
            server.stop()
            server.process.wait(timeout=START_TIMEOUT)
    return template_path()


def template_path() -> Path:
    """The migrated database kept for fresh state directories: per Prefect version, whose migrations made it."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "imagegw" / f"prefect-{version('prefect')}.db"


def _migrated_as_template(database: Path) -> bool:
    """Whether ``database`` had the same migrations as the template (this Prefect version's), as far as it can tell."""
    migration = _last_migration(template_path())
    return migration is not None and _last_migration(database) == migration


def _last_migration(database: Path) -> str | None:
    try:
        with closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)) as reading:
            row = reading.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None
    return str(row[0]) if row else None


def _seed(database: Path) -> bool:
    """Copy the template into ``database``, if there is one; whether it was."""
    template = template_path()
    if not template.exists():
        return False
    database.parent.mkdir(parents=True, exist_ok=True)
    _copy_database(template, database)
    return True


def _keep_as_template(database: Path) -> None:
    """Keep a freshly migrated database, before any run is written to it, as the template of later ones.

    A failure costs only the next fresh state directory its migrations: it is not the pull's.
    """
    try:
        _copy_database(database, template_path())
    except (OSError, sqlite3.Error) as exc:
        print(f"imagegw: could not keep the migrated Prefect database as {template_path()}: {exc}", file=sys.stderr)


def _copy_database(source: Path, target: Path) -> None:
    """A consistent copy of a SQLite database that a server may have open, put in place whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    with closing(sqlite3.connect(source)) as reading, closing(sqlite3.connect(partial)) as writing:
        reading.backup(writing)
        # One self-contained file (a WAL database is three): Prefect's server turns WAL on again as it opens it.
        writing.execute("PRAGMA journal_mode = DELETE")
    partial.replace(target)
