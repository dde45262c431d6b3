"""Run a throw-away Docker registry (Debian ``docker-registry`` 2.8) for tests and demos.

Three flavours are supported by :meth:`RunningRegistry.start`:

* anonymous plain HTTP (the default),
* HTTP Basic auth from an htpasswd file (``htpasswd_users``),
* Docker token auth against a :class:`~testsupport.tokenserver.TokenServer`.

Every registry listens on a free port of 127.0.0.1, keeps its storage, config and
log inside the given work directory, and is stopped with SIGTERM (then SIGKILL).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bcrypt
import requests

from imagegw.processes import free_port
from testsupport.service import ChildService, retry_port_taken
from testsupport.tls import PrivateCa

if TYPE_CHECKING:
    from testsupport.tokenserver import TokenServer

REGISTRY_BINARY = "docker-registry"
INSTALL_HINT = "apt-get install docker-registry"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
_BIND_ATTEMPTS = 3


class RegistryStartError(RuntimeError):
    """The registry process did not come up; the message carries its log tail."""


def find_registry_binary() -> str:
    """Return the path of ``docker-registry`` or raise with the install hint."""
    path = shutil.which(REGISTRY_BINARY)
    if path is None:
        raise RegistryStartError(f"{REGISTRY_BINARY} not found on PATH: {INSTALL_HINT}")
    return path


def write_htpasswd(path: Path, users: dict[str, str]) -> None:
    """Write an htpasswd file with bcrypt hashes (what ``htpasswd -B`` produces)."""
    lines = []
    for user, password in users.items():
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
        lines.append(f"{user}:{hashed}\n")
    path.write_text("".join(lines))


def _yaml_lines(value: dict[str, Any], indent: int = 0) -> list[str]:
    """Render nested dicts as block YAML; scalars are JSON, which YAML accepts."""
    lines = []
    pad = "  " * indent
    for key, item in value.items():
        if isinstance(item, dict):
            lines.append(f"{pad}{key}:")
            lines.extend(_yaml_lines(item, indent + 1))
        else:
            lines.append(f"{pad}{key}: {json.dumps(item)}")
    return lines


def registry_config(
    port: int,
    storage: Path,
    *,
    htpasswd: Path | None = None,
    token_server: TokenServer | None = None,
    notify: Notify | None = None,
    tls: PrivateCa | None = None,
) -> dict[str, Any]:
    """Build the registry configuration as a dict (written to YAML by the caller)."""
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "info", "formatter": "text"},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": "imagegw-test-only-secret"},
    }
    if htpasswd is not None:
        config["auth"] = {"htpasswd": {"realm": "basic-realm", "path": str(htpasswd)}}
    elif token_server is not None:
        config["auth"] = {
            "token": {
                "realm": token_server.realm,
                "service": token_server.service,
                "issuer": token_server.issuer,
                "rootcertbundle": str(token_server.cert_path),
            }
        }
    if tls is not None:
        config["http"]["tls"] = {"certificate": str(tls.server_cert), "key": str(tls.server_key)}
    if notify is not None:
        endpoint = {"name": "imagegw", "url": notify.url, "timeout": "2s", "threshold": 3, "backoff": "1s",
                    "headers": {"Authorization": [notify.authorization]}}
        config["notifications"] = {"endpoints": [endpoint]}
    return config


def write_config(path: Path, config: dict[str, Any]) -> None:
    """Write ``config`` as a YAML file."""
    path.write_text("\n".join(_yaml_lines(config)) + "\n")


def _clean_env() -> dict[str, str]:
    """The current environment without ``REGISTRY_*`` overrides of the config."""
    return {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}


def _answers(url: str, ca: Path | None = None) -> bool:
    """True when ``GET {url}/v2/`` gives 200 or 401."""
    try:
        response = requests.get(f"{url}/v2/", timeout=1, verify=str(ca) if ca else True)
    except requests.RequestException:
        return False
    return response.status_code in (200, 401)


@dataclass(frozen=True)
class Notify:
    """Where the registry sends its notifications (Distribution's ``notifications.endpoints``)."""

    url: str
    authorization: str
    """The Authorization header sent with each notification."""


class RunningRegistry(ChildService):
    """A ``docker-registry serve`` process listening on 127.0.0.1.

    Attributes:
        url: base URL, ``http://127.0.0.1:PORT``.
        host: ``127.0.0.1:PORT`` (the registry part of an image reference).
        storage: the filesystem storage root.
        credentials: (user, password) accepted by the registry or its token
            server, ``None`` for an anonymous registry.
        token_server: the token server the registry trusts, if any (not owned:
            :meth:`stop` does not stop it).
        workdir: directory holding config.yml, registry.log and the storage.
    """

    stop_timeout = STOP_TIMEOUT

    def __init__(
        self,
        *,
        workdir: Path,
        port: int,
        credentials: tuple[str, str] | None,
        token_server: TokenServer | None,
        tls: PrivateCa | None = None,
    ) -> None:
        super().__init__(workdir / "registry.log")
        self.workdir = workdir
        self.port = port
        self.host = f"127.0.0.1:{port}"
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        self.storage = workdir / "storage"
        self.credentials = credentials
        self.token_server = token_server

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        htpasswd_users: dict[str, str] | None = None,
        token_server: TokenServer | None = None,
        notify: Notify | None = None,
        tls: PrivateCa | None = None,
    ) -> RunningRegistry:
        """Start a registry in ``workdir`` and wait until ``/v2/`` answers.

        ``htpasswd_users`` enables Basic auth; ``token_server`` enables token auth
        (the two are exclusive); ``tls`` serves HTTPS with a certificate of that private
        CA. Raises :class:`RegistryStartError` with the log tail when the registry does
        not answer within ~15 s.
        """
        if htpasswd_users and token_server is not None:
            raise ValueError("choose either htpasswd_users or token_server, not both")
        binary = find_registry_binary()
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "storage").mkdir(exist_ok=True)
        htpasswd = None
        credentials: tuple[str, str] | None = None
        if htpasswd_users:
            htpasswd = workdir / "htpasswd"
            write_htpasswd(htpasswd, htpasswd_users)
            credentials = next(iter(htpasswd_users.items()))
        elif token_server is not None and token_server.users:
            credentials = next(iter(token_server.users.items()))
        return retry_port_taken(
            lambda: cls._start_once(binary, workdir, htpasswd, token_server, credentials, notify, tls), _PortTaken,
            _BIND_ATTEMPTS
        )

    @classmethod
    def _start_once(
        cls,
        binary: str,
        workdir: Path,
        htpasswd: Path | None,
        token_server: TokenServer | None,
        credentials: tuple[str, str] | None,
        notify: Notify | None,
        tls: PrivateCa | None,
    ) -> RunningRegistry:
        """One start attempt on a fresh port; raises :class:`_PortTaken` on a bind race."""
        port = free_port()
        config_path = workdir / "config.yml"
        write_config(
            config_path,
            registry_config(port, workdir / "storage", htpasswd=htpasswd, token_server=token_server, notify=notify,
                            tls=tls),
        )
        registry = cls(workdir=workdir, port=port, credentials=credentials, token_server=token_server, tls=tls)
        registry._spawn([binary, "serve", str(config_path)], cwd=workdir, env=_clean_env())
        registry._wait_ready()
        return registry

    def _wait_ready(self) -> None:
        """Poll ``/v2/`` until it answers, the process dies, or time runs out."""
        failure = self._wait_answering(lambda: _answers(self.url, self.tls.ca_cert if self.tls else None),
                                       START_TIMEOUT, 0.05)
        if failure is None:
            return
        if failure.says("address already in use"):
            raise _PortTaken(f"port {self.port} was taken:\n{failure.log_tail}")
        state = failure.state(
            f"did not answer GET /v2/ within {START_TIMEOUT:.0f} s", exited_suffix=" before answering"
        )
        raise RegistryStartError(
            f"docker-registry on {self.host} {state} "
            f"(config {self.workdir / 'config.yml'}); last lines of {self.log_path}:\n{failure.log_tail}"
        )

    def blob_path(self, digest: str) -> Path:
        """The file holding the blob ``digest`` (``sha256:<hex>``) in the storage."""
        algorithm, _, hexdigest = digest.partition(":")
        if not algorithm or len(hexdigest) < 2:
            raise ValueError(f"not a digest: {digest!r}")
        return (
            self.storage / "docker" / "registry" / "v2" / "blobs"
            / algorithm / hexdigest[:2] / hexdigest / "data"
        )

    def __repr__(self) -> str:
        auth = "token" if self.token_server else ("basic" if self.credentials else "anonymous")
        return f"<RunningRegistry {self.url} {auth} running={self.running}>"


class _PortTaken(RegistryStartError):
    """The chosen port was grabbed by someone else before the registry bound it."""
