"""Sealing the registry logins that wait in MongoDB for a pull's run: encrypted with a key only the gateway holds.

A login sits in the ``pull_logins`` collection between the request and the run that uses it
(seconds, at most an hour). Sealed with Fernet (AES-128-CBC and HMAC-SHA256), it is useless to
whoever reads the database, its backups or its logs without the key file: generated on first use
into the state directory, mode 0600, or named by ``SealKeyFile`` so that the API and workers on
other hosts share one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from imagegw.errors import ConfigError


class Sealer:
    """Seals and opens small JSON documents with one key."""

    def __init__(self, key: bytes) -> None:
        self._fernet = Fernet(key)

    def seal(self, document: dict[str, Any]) -> bytes:
        return self._fernet.encrypt(json.dumps(document).encode())

    def open(self, sealed: bytes, where: str) -> dict[str, Any]:
        """The sealed document; an error naming ``where`` when another key sealed it (or it was altered)."""
        try:
            document = json.loads(self._fernet.decrypt(sealed))
        except (InvalidToken, ValueError):
            raise ConfigError(f"{where} was sealed with another key: the API and the workers must share one "
                              "SealKeyFile") from None
        if not isinstance(document, dict):
            raise ConfigError(f"{where} is not a sealed login")
        return document


_sealers: dict[Path, Sealer] = {}


def sealer_for(key_file: Path) -> Sealer:
    """The sealer of ``key_file``, which is created (mode 0600) with a new key if it does not exist.

    The key is read once per process: the store is opened for every API request.
    """
    if key_file in _sealers:
        return _sealers[key_file]
    if not key_file.exists():
        _create_key(key_file)
    try:
        sealer = _sealers[key_file] = Sealer(key_file.read_bytes().strip())
        return sealer
    except OSError as exc:
        raise ConfigError(f"SealKeyFile {key_file}: {exc.strerror}") from None
    except ValueError:
        raise ConfigError(f"SealKeyFile {key_file} does not hold a key (32 bytes, url-safe base64)") from None


def _create_key(key_file: Path) -> None:
    """Write a new key, complete before it has its name: processes starting together agree on one."""
    key_file.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{key_file.name}.", dir=key_file.parent)  # mode 0600
    draft = Path(name)
    with os.fdopen(fd, "wb") as out:
        out.write(Fernet.generate_key())
    try:
        os.link(draft, key_file)  # fails if another process's key got there first: that one is kept
    except FileExistsError:
        pass
    finally:
        draft.unlink()
