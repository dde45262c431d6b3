"""``/healthz``: whether the services the gateway needs are up, and why not, for those who may know.

A load balancer calls it without credentials and needs only up or down. Why a service is down
names its URL, host and port or socket path (the MongoDB URI, the Prefect API, munged's socket):
that is for the gateway's admins, not for anyone who can reach the port.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import requests

from imagegw.config import Platform, Settings
from imagegw.errors import ImagegwError
from imagegw.service import decode_credential, encode_credential, identify
from imagegw.store import check_reachable, open_database

PREFECT_TIMEOUT = 3.0


@dataclass(frozen=True)
class Health:
    """Each checked service's problem: None when it is up."""

    problems: dict[str, str | None]

    @property
    def healthy(self) -> bool:
        return all(problem is None for problem in self.problems.values())

    def summary(self) -> dict[str, Any]:
        """What a load balancer needs, and nothing that names a host, port or path."""
        return {"healthy": self.healthy,
                "checks": {name: "up" if problem is None else "down" for name, problem in self.problems.items()}}

    def details(self) -> dict[str, Any]:
        """The summary and why each service that is down is down."""
        return {**self.summary(), "details": {name: problem for name, problem in self.problems.items()
                                              if problem is not None}}


def check_health(settings: Settings) -> Health:
    """Probe MongoDB, the Prefect API and every platform's munged."""
    probes: dict[str, Callable[[], object]] = {
        "mongodb": lambda: check_reachable(open_database(settings)),
        "prefect": _prefect_health,
        **{f"munge:{name}": partial(encode_credential, b"", platform.munge_socket)
           for name, platform in settings.platforms.items()},
    }
    return Health({name: _problem(probe) for name, probe in probes.items()})


def vouches_for_admin(settings: Settings, credential: str | None) -> bool:
    """Whether ``credential`` is valid and its user an admin of a platform whose munged accepts it.

    Never an error: a caller without a good credential is simply not told the details.
    """
    if not credential:
        return False
    # munged refuses a credential it decoded once (a replay): each munged decodes it once, for all its platforms.
    served_by: dict[str | None, list[Platform]] = {}
    for platform in settings.platforms.values():
        served_by.setdefault(platform.munge_socket, []).append(platform)
    for socket, platforms in served_by.items():
        try:
            caller = identify(decode_credential(credential, socket))
        except ImagegwError:  # another munged (another key) may accept it
            continue
        if any(caller.is_admin(platform) for platform in platforms):
            return True
    return False


def _problem(probe: Callable[[], object]) -> str | None:
    try:
        probe()
    except Exception as exc:  # a health check reports every failure, whatever its kind
        return str(exc) or type(exc).__name__
    return None


def _prefect_health() -> None:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise RuntimeError("PREFECT_API_URL is not set")
    response = requests.get(f"{url.rstrip('/')}/health", timeout=PREFECT_TIMEOUT)
    response.raise_for_status()
