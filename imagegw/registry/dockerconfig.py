"""Registry credentials from a docker config file, found the way the docker CLI finds them.

An operator who has run ``docker login`` (or set up a credential helper) on the gateway's host gets those
credentials for pulls without copying secrets into the gateway's configuration. The file is
``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``. For a registry, docker asks, in order: the helper
``credHelpers`` names for it, the default helper ``credsStore``, the file's ``auths``. A helper's answer is final:
with a helper in charge, ``auths`` entries are placeholders that docker ignores, and so do we.

The file is parsed here rather than by the ``docker`` SDK's ``resolve_authconfig``, which drops entries that have
``username``/``password`` but no ``auth``, does not know ``registry-1.docker.io``, and answers in different key
cases by source. Helpers are run here too: the SDK's ``Store`` has no timeout. No secret reaches a message or repr.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from imagegw.config import DOCKER_HUB_HOSTS
from imagegw.errors import ConfigError
from imagegw.registry.credentials import Credential

DOCKER_HUB_KEY = "https://index.docker.io/v1/"
"""The key ``docker login`` writes for Docker Hub, and the server URL that helpers know Docker Hub by."""

HELPER_TIMEOUT_SECONDS = 30.0
"""A helper stuck on a locked keyring or a passphrase prompt must fail the pull, not hang it."""

_HELPER_PREFIX = "docker-credential-"
_TOKEN_USERNAME = "<token>"
"""A helper's username meaning that its secret is an identity token, not a password."""

_Value = TypeVar("_Value")


@dataclass(frozen=True)
class DockerConfigCredentials:
    """The credentials one docker config file gives, by registry key (see :func:`registry_key`)."""

    path: Path
    auths: Mapping[str, Credential]
    helpers: Mapping[str, str]
    default_helper: str | None
    environ: Mapping[str, str] = field(repr=False)
    """The environment helpers run in (and whose ``PATH`` finds them); it may hold secrets of its own."""

    @classmethod
    def load(cls, environ: Mapping[str, str], home: Path) -> DockerConfigCredentials | None:
        """The docker config that ``environ`` (``DOCKER_CONFIG``) and ``home`` point to; None when there is none.

        Raises ConfigError, naming the file and the key, when the file is unreadable or malformed: a login
        silently ignored would surface later as a baffling "unauthorized" from the registry.
        """
        path = _config_path(environ, home)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            raise ConfigError(f"{_source(path)} is not UTF-8 text") from None
        except OSError as error:
            raise ConfigError(f"{_source(path)} cannot be read: {error.strerror}") from None
        try:
            document = _object(json.loads(text), _source(path))
        except ValueError:
            raise ConfigError(f"{_source(path)} is not JSON") from None
        return cls(
            path=path,
            auths=_by_registry(_file_credentials(path, document.get("auths"))),
            helpers=_by_registry(_helper_names(path, document.get("credHelpers"))),
            default_helper=_string(document, "credsStore", _source(path)) or None,
            environ=environ,
        )

    def credential_for(self, host: str) -> Credential | None:
        """The credential for registry ``host`` (``name[:port]`` as in an image reference), or None.

        Raises ConfigError when the helper in charge of ``host`` is missing, fails, or answers nonsense.
        """
        registry = registry_key(host)
        helper = self.helpers.get(registry, self.default_helper)
        if helper is None:
            return self.auths.get(registry)
        return self._ask_helper(helper, registry)

    def _ask_helper(self, helper: str, registry: str) -> Credential | None:
        """Run ``docker-credential-<helper> get`` with ``registry`` on stdin; "credentials not found" means None."""
        program = _HELPER_PREFIX + helper
        source = f"credential helper {program} ({_source(self.path)})"
        executable = shutil.which(program, path=self.environ.get("PATH", os.defpath))
        if executable is None:
            raise ConfigError(f"{source}: {program} is not on PATH")
        try:
            answer = subprocess.run([executable, "get"], input=registry.encode(), capture_output=True,
                                    env=dict(self.environ), timeout=HELPER_TIMEOUT_SECONDS, check=False)
        except subprocess.TimeoutExpired:
            raise ConfigError(f"{source}: no answer for {registry} in {HELPER_TIMEOUT_SECONDS:g} s") from None
        except OSError as error:
            raise ConfigError(f"{source} cannot be run: {error.strerror}") from None
        if answer.returncode != 0:
            # Helpers print their errors on stdout; the docker-credential-helpers' "not found" is
            # "credentials not found in native keychain". A message is a line or two, not a dump.
            message = (answer.stdout or answer.stderr).decode(errors="replace").strip()
            if "credentials not found" in message.lower():
                return None
            raise ConfigError(f"{source} failed for {registry} (exit status {answer.returncode}): {message[:200]}")
        return _helper_credential(source, registry, answer.stdout)


def _config_path(environ: Mapping[str, str], home: Path) -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``<home>/.docker/config.json``; an empty ``DOCKER_CONFIG`` is unset."""
    directory = environ.get("DOCKER_CONFIG") or home / ".docker"
    return Path(directory) / "config.json"


def registry_key(address: str) -> str:
    """The registry that an ``auths``/``credHelpers`` key or an image's host names.

    Docker writes keys as ``host[:port]``, ``https://host`` or ``http://host/v1/``: only host and port name the
    registry. Host names are case-insensitive. All of Docker Hub's aliases are the one key ``docker login`` writes.
    """
    host = address.split("://", 1)[-1].split("/", 1)[0].lower()
    return DOCKER_HUB_KEY if host in DOCKER_HUB_HOSTS else host


def _by_registry(entries: Mapping[str, _Value]) -> dict[str, _Value]:
    """``entries`` by registry key. Where two keys name one registry (``ghcr.io`` and ``https://ghcr.io``), a key
    written as docker looks it up wins, as docker tries the exact key first; then the first in the file."""
    exact_first = sorted(entries.items(), key=lambda item: item[0] != registry_key(item[0]))
    by_registry: dict[str, _Value] = {}
    for key, value in exact_first:
        by_registry.setdefault(registry_key(key), value)
    return by_registry


def _file_credentials(path: Path, auths: object) -> dict[str, Credential]:
    """The ``auths`` entries that hold a credential; ``{}`` placeholders (left by ``docker login`` with a helper)
    hold none."""
    entries = {key: _file_credential(path, key, entry) for key, entry in _object(auths, _where(path, "auths")).items()}
    return {key: credential for key, credential in entries.items() if credential is not None}


def _file_credential(path: Path, key: str, entry: object) -> Credential | None:
    """One ``auths`` entry: base64 ``auth`` ("user:password") if set, else ``username``/``password``; and tokens."""
    where = _where(path, f"auths[{key!r}]")
    fields = _object(entry, where)
    auth = _string(fields, "auth", where)
    if auth:
        username, password = _decode_auth(auth, where)
    else:
        username, password = _string(fields, "username", where), _string(fields, "password", where)
    identity_token = _string(fields, "identitytoken", where)
    registry_token = _string(fields, "registrytoken", where)
    if not (username or password or identity_token or registry_token):
        return None
    return Credential(_source(path), username=username or None, password=password or None,
                      identity_token=identity_token or None, registry_token=registry_token or None)


def _decode_auth(auth: str, where: str) -> tuple[str, str]:
    """``auth``'s user and password, split at the first colon: passwords may hold colons, user names may not."""
    try:
        decoded = base64.b64decode(auth, validate=True).decode("utf-8")
    except ValueError:  # bad base64, non-ASCII text and non-UTF-8 bytes alike
        raise ConfigError(f"{where}.auth is not base64 of UTF-8 \"user:password\"") from None
    username, colon, password = decoded.partition(":")
    if not colon:
        raise ConfigError(f"{where}.auth has no ':' between user and password")
    return username, password


def _helper_names(path: Path, helpers: object) -> dict[str, str]:
    """``credHelpers``: the helper name (``docker-credential-<name>``) for each registry key."""
    where = _where(path, "credHelpers")
    names = {}
    for key, name in _object(helpers, where).items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}[{key!r}] must name a helper (a string, <name> of docker-credential-<name>)")
        names[key] = name
    return names


def _helper_credential(source: str, registry: str, output: bytes) -> Credential | None:
    """A helper's answer ``{"ServerURL", "Username", "Secret"}``; both empty means none (docker-credential-pass
    answers that way instead of "not found")."""
    try:
        answer = json.loads(output)
    except ValueError:
        answer = None
    if not (isinstance(answer, dict) and isinstance(answer.get("Username"), str)
            and isinstance(answer.get("Secret"), str)):
        raise ConfigError(f"{source}: the answer for {registry} is not JSON with a Username and a Secret")
    username, secret = answer["Username"], answer["Secret"]
    if username == _TOKEN_USERNAME:
        return Credential(source, identity_token=secret) if secret else None
    if not (username or secret):
        return None
    return Credential(source, username=username or None, password=secret or None)


def _object(value: object, where: str) -> dict[str, object]:
    """``value`` as a JSON object; ``null`` is an empty one, as Go's encoder writes an empty map."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a JSON object")
    return value


def _string(fields: Mapping[str, object], name: str, where: str) -> str:
    """Field ``name`` of an object, "" when absent or ``null``; its value stays out of the message (a secret)."""
    value = fields.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {name} must be a string")
    return value


def _source(path: Path) -> str:
    return f"docker config {path}"


def _where(path: Path, key: str) -> str:
    return f"{_source(path)}: {key}"
