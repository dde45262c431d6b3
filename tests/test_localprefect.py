"""Which Prefect server a command uses: whether one answers, and which database a temporary one may open without
checking Prefect's migrations first."""

from __future__ import annotations

import socket
import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest

from cli.localprefect import _migrated_as_template, prefect_healthy, template_path


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
