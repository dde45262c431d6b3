"""Which Prefect server a command uses: whether one answers, and which database a temporary one may open without
checking Prefect's migrations first."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from cli.localprefect import _migrated_as_template, prefect_healthy, prefect_wants_csrf_tokens, template_path
from testsupport.service import LoopbackHttpServer, answer_json


def _database(path: Path, migration: str | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(path)) as database:
        database.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        if migration is not None:
            database.execute("INSERT INTO alembic_version VALUES (?)", (migration,))
        database.commit()
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def test_a_database_at_the_templates_migration_skips_the_check(cache: Path) -> None:
    _database(template_path(), "27d8f4e1a6c9")

    assert _migrated_as_template(_database(cache / "made" / "prefect.db", "27d8f4e1a6c9"))


def test_a_database_an_other_prefect_migrated_is_checked(cache: Path) -> None:
    _database(template_path(), "27d8f4e1a6c9")

    assert not _migrated_as_template(_database(cache / "older" / "prefect.db", "3c841a1800a1"))
    assert not _migrated_as_template(_database(cache / "empty" / "prefect.db", None))
    assert not _migrated_as_template(cache / "missing" / "prefect.db")


def test_without_a_template_every_database_is_checked(cache: Path) -> None:
    assert not _migrated_as_template(_database(cache / "made" / "prefect.db", "27d8f4e1a6c9"))


def test_a_server_counts_as_healthy_only_when_prefects_health_check_answers_true() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def answer_not_http() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(4096)
                connection.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

        threading.Thread(target=answer_not_http, daemon=True).start()
        assert not prefect_healthy(f"http://127.0.0.1:{listener.getsockname()[1]}/api")
    assert not prefect_healthy("127.0.0.1:4200/api"), "no scheme: not a URL urllib can open"
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    assert not prefect_healthy(f"http://127.0.0.1:{port}/api")


def test_prefects_own_server_wants_no_csrf_tokens(prefect_api: None) -> None:
    from prefect.settings import PREFECT_API_URL

    assert not prefect_wants_csrf_tokens(str(PREFECT_API_URL.value()))


class _CsrfAnswer(BaseHTTPRequestHandler):
    def log_message(self, *_: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        server: _CsrfServer = self.server.owner  # type: ignore[attr-defined]
        answer_json(self, server.status, b'{"token": "t", "expiration": "2099-01-01T00:00:00Z"}')


class _CsrfServer(LoopbackHttpServer):
    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(_CsrfAnswer)


@pytest.mark.parametrize(("status", "wanted"), [(200, True), (500, True), (404, True), (422, False)])
def test_a_server_wants_csrf_tokens_unless_it_refuses_them_with_422(status: int, wanted: bool) -> None:
    with _CsrfServer(status) as server:
        assert prefect_wants_csrf_tokens(f"{server.url}/api") is wanted


def prepare(cache: Path, **environment: str) -> str:
    """``imagegw prepare`` as a user runs it, with ``cache`` as the user's cache directory; what it printed."""
    ran = subprocess.run([sys.executable, "-m", "cli", "prepare"], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "XDG_CACHE_HOME": str(cache / "cache"), **environment})
    assert ran.returncode == 0, ran.stderr
    return ran.stdout.strip()


def test_prepare_keeps_a_migrated_database_once_and_its_copies_skip_the_check(cache: Path) -> None:
    assert prepare(cache) == f"kept a migrated Prefect database as {template_path()}"

    with closing(sqlite3.connect(template_path())) as database:
        assert database.execute("SELECT count(*) FROM flow_run").fetchone() == (0,)
        [(migration,)] = database.execute("SELECT version_num FROM alembic_version").fetchall()
    assert os.listdir(template_path().parent) == [template_path().name], "one file, and no partial copy"
    assert _migrated_as_template(_database(cache / "made" / "prefect.db", migration))
    assert prepare(cache) == f"nothing to do: {template_path()} is there"


def test_prepare_does_nothing_for_prefect_on_a_database_of_its_own(cache: Path) -> None:
    assert prepare(cache, PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://nobody@127.0.0.1/none") == (
        "nothing to do: Prefect is set to a database of its own (PREFECT_API_DATABASE_CONNECTION_URL)")
    assert not template_path().exists()
