"""Where ``imagegw pull`` runs its flow: on a host where ``imagegw serve`` runs, through serve's Prefect server and
no temporary one (after serve was killed, the file naming its server is ignored); where nothing runs, through a
temporary server whose fresh database is a copy of the first one it migrated."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import requests

from cli.localprefect import SERVED_PREFECT_API
from imagegw.processes import descendants
from tests.serve_fixtures import PLATFORM, STOP_TIMEOUT, gateway_env, processes_mentioning, serving, write_config
from testsupport.images import LayerBuilder, push_image
from testsupport.registry import RunningRegistry

IMAGEGW = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "imagegw"
TEMPORARY_SERVER = b"prefect.server.api.server:create_app"
"""In the command line of the temporary server Prefect starts when it has no API URL."""
PULL_TIMEOUT = 180.0
"""A pull that starts a temporary server on a busy 2-core host: its start alone may take 20 s."""


@dataclass
class Pulled:
    returncode: int
    record: dict[str, object]
    stderr: str
    temporary_server: bool
    """Whether a temporary Prefect server ran below the command at any moment of it."""


def imagegw_pull(image: str, config: Path, cache: Path | None = None) -> Pulled:
    """``imagegw pull`` as a user runs it (no PREFECT_* set), watching what processes it starts; ``cache`` is
    its user's cache directory (XDG_CACHE_HOME)."""
    command = [str(IMAGEGW), "pull", image, "--platform", PLATFORM, "--config", str(config)]
    env = {**gateway_env(), **({"XDG_CACHE_HOME": str(cache)} if cache else {})}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    temporary_server = False
    deadline = time.monotonic() + PULL_TIMEOUT
    while process.poll() is None and time.monotonic() < deadline:
        temporary_server = temporary_server or any(TEMPORARY_SERVER in _command_line(pid)
                                                   for pid in descendants(process.pid))
        time.sleep(0.05)
    out, err = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
    return Pulled(process.returncode, json.loads(out), err.decode(), temporary_server)


def _command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def flow_run_names(prefect_api: str) -> list[str]:
    response = requests.post(f"{prefect_api}/flow_runs/filter", json={}, timeout=10)
    response.raise_for_status()
    return [run["name"] for run in response.json()]


def test_pull_runs_through_the_served_prefect_server(tmp_path: Path, registry: RunningRegistry) -> None:
    push_image(registry, "reuse/app", "1", [LayerBuilder().file("app", b"app")])
    config = write_config(tmp_path, registry)
    with serving(tmp_path, config) as served:
        assert (tmp_path / "state" / SERVED_PREFECT_API).read_text().strip() == served.prefect_api

        pulled = imagegw_pull(f"{registry.host}/reuse/app:1", config)

        assert pulled.returncode == 0, pulled.stderr
        assert pulled.record["status"] == "READY"
        assert not pulled.temporary_server, "the pull started a Prefect server of its own"
        assert f"pull {registry.host}/reuse/app:1 for {PLATFORM}" in flow_run_names(served.prefect_api)
    assert not (tmp_path / "state" / SERVED_PREFECT_API).exists(), "serve removes the file when it stops"


def test_pull_ignores_the_server_of_a_killed_serve(tmp_path: Path, registry: RunningRegistry) -> None:
    push_image(registry, "reuse/after", "1", [LayerBuilder().file("after", b"after")])
    config = write_config(tmp_path, registry)
    with serving(tmp_path, config) as served:
        served.process.kill()  # no chance to remove its file; its parts get the parent-death signal
        served.process.wait()
        deadline = time.monotonic() + STOP_TIMEOUT
        while processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (tmp_path / "state" / SERVED_PREFECT_API).exists(), "a killed serve leaves its file"

        pulled = imagegw_pull(f"{registry.host}/reuse/after:1", config, tmp_path / "cache")

    assert pulled.returncode == 0, pulled.stderr
    assert pulled.record["status"] == "READY"
    assert pulled.temporary_server, "with serve's server gone, the pull starts its own"


def test_a_fresh_state_directory_gets_a_migrated_prefect_database(tmp_path: Path, registry: RunningRegistry) -> None:
    for name in ("first", "second"):
        push_image(registry, f"fresh/{name}", "1", [LayerBuilder().file(name, name.encode())])
    cache, first_root, second_root = tmp_path / "cache", tmp_path / "first", tmp_path / "second"
    first_root.mkdir()
    second_root.mkdir()

    first = imagegw_pull(f"{registry.host}/fresh/first:1", write_config(first_root, registry), cache)

    assert first.returncode == 0, first.stderr
    assert first.temporary_server
    [template] = (cache / "imagegw").glob("prefect-*.db")
    with closing(sqlite3.connect(template)) as database:
        assert database.execute("SELECT count(*) FROM flow_run").fetchone() == (0,), "kept before its run was made"
        assert database.execute("SELECT version_num FROM alembic_version").fetchone(), "migrated"
        database.execute("PRAGMA user_version = 4242")  # a mark the copy must carry (Prefect does not use it)
    assert os.listdir(cache / "imagegw") == [template.name], "one file, and no partial copy"

    second = imagegw_pull(f"{registry.host}/fresh/second:1", write_config(second_root, registry), cache)

    assert second.returncode == 0, second.stderr
    assert second.record["status"] == "READY"
    with closing(sqlite3.connect(second_root / "state" / "prefect" / "prefect.db")) as database:
        assert database.execute("PRAGMA user_version").fetchone() == (4242,), "the template was copied"
        [(run_name,)] = database.execute("SELECT name FROM flow_run").fetchall()
        stages = {name.rsplit("-", 1)[0] for (name,) in
                  database.execute("SELECT name FROM task_run WHERE state_type = 'COMPLETED'").fetchall()}
    assert run_name == f"pull {registry.host}/fresh/second:1 for {PLATFORM}"
    assert {"pull", "unpack", "squash", "transfer", "index"} <= stages, "the temporary server recorded each stage"
