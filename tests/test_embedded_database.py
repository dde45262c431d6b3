"""With no MongoDBURI the gateway runs SecantusDB itself, and stops it when it exits, with what it wrote kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

IMAGEGW = os.path.join(os.path.dirname(sys.executable), "imagegw")


def imagegw(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """``imagegw ARGUMENTS -p c`` on a configuration without MongoDBURI, its state under ``tmp_path``."""
    config = tmp_path / "imagemanager.json"
    config.write_text(json.dumps({
        "StateDirectory": str(tmp_path / "state"),
        "Platforms": {"c": {"accesstype": "local", "local": {"imageDir": str(tmp_path / "images")}}},
    }))
    env = {key: value for key, value in os.environ.items() if key != "IMAGEGW_MONGODB_URI"}
    return subprocess.run([IMAGEGW, *arguments, "-p", "c", "-c", str(config)], env=env, capture_output=True,
                          text=True, timeout=60)


def test_gateway_starts_the_embedded_database_and_stops_it_on_exit(tmp_path: Path) -> None:
    done = imagegw(tmp_path, "images")

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["TAG", "ID", "SIZE", "PULLED", "EXPIRES"]
    home = tmp_path / "state" / "mongo"
    assert (home / "data").is_dir() and "listening" in (home / "secantus.log").read_text()
    assert not (home / "server.json").exists()
    assert not [command for command in _command_lines() if "secantus" in command and str(home) in command]


def test_what_one_command_wrote_is_read_by_the_next_after_the_database_stopped(tmp_path: Path) -> None:
    added = imagegw(tmp_path, "watch", "add", "ubuntu:24.04")
    listed = imagegw(tmp_path, "watch", "list")

    assert added.returncode == 0, added.stderr
    assert listed.returncode == 0, listed.stderr
    assert "ubuntu:24.04" in listed.stdout


def _command_lines() -> list[str]:
    lines = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return lines
