"""Throwaway users and a group on this host (useradd, groupadd), for what the kernel or NSS decides by user."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

ID_RANGE = ["-K", "UID_MIN=42000", "-K", "UID_MAX=42999", "-K", "GID_MIN=42000", "-K", "GID_MAX=42999"]
"""useradd and groupadd pick free ids in this range themselves (under their lock, so runs cannot collide)."""


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class People:
    """Throwaway users on this host: ``caller`` is in ``team``; ``owner`` and ``outsider`` are not."""

    caller: User
    """A member of ``team`` through its supplementary groups (its primary group is its own)."""
    owner: User
    outsider: User
    team: int


@pytest.fixture(scope="module")
def people() -> Iterator[People]:
    if os.geteuid() != 0:
        pytest.skip("creating users needs root")
    if shutil.which("useradd") is None or shutil.which("setfacl") is None:
        pytest.skip("needs useradd (passwd) and setfacl (acl)")
    prefix = f"igw{secrets.token_hex(3)}"
    made: list[str] = []
    team = f"{prefix}team"
    try:
        subprocess.run(["groupadd", *ID_RANGE, team], check=True)
        users = [_add_user(f"{prefix}{role}", made, *extra)
                 for role, extra in (("caller", ["-G", team]), ("owner", []), ("outsider", []))]
        yield People(caller=users[0], owner=users[1], outsider=users[2], team=_gid(team))
    finally:
        for name in made:
            subprocess.run(["userdel", name], check=False)
        subprocess.run(["groupdel", team], check=False, stderr=subprocess.DEVNULL)


def _add_user(name: str, made: list[str], *options: str) -> User:
    subprocess.run(["useradd", *ID_RANGE, "-U", "-M", "-s", "/usr/sbin/nologin", *options, name], check=True)
    made.append(name)
    ids = subprocess.run(["id", "-u", name], check=True, capture_output=True, text=True).stdout
    return User(name, int(ids), _gid(name))


def _gid(group: str) -> int:
    return int(subprocess.run(["getent", "group", group], check=True, capture_output=True,
                              text=True).stdout.split(":")[2])
