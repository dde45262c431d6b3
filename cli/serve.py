"""``imagegw serve``: everything one gateway host needs, started and stopped together.

The parts start in dependency order: the embedded database (unless ``MongoDBURI``
names one), a Prefect server with its UI (unless ``PREFECT_API_URL`` names one),
the per-platform work pools and deployments (``imagegw deploy``), a worker on every
platform's pool, and the REST API. Each child runs
in its own session, so a Ctrl-C on the terminal reaches only this process, which
then stops the children in reverse order.

Prefect is not imported here: it is imported by the worker and API processes,
whose settings this module passes through their environment.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from urllib.parse import quote, urlsplit, urlunsplit

from cli.localprefect import prefect_answer, prefect_healthy, prefect_wants_csrf_tokens, record_served_prefect_api
from deployments import work_pool_name
from imagegw.config import MONGODB_URI_ENV, Settings
from imagegw.errors import ServiceUnavailable
from imagegw.processes import descendants, dying_with_this_process, listening, log_tail
from imagegw.store import ensure_embedded_server

STOP_TIMEOUT = 5.0
"""Seconds a child gets to exit after SIGTERM: a Prefect runner may ignore it for 8–16 s."""
PREFECT_START_TIMEOUT = 120.0
"""A fresh Prefect database runs its migrations first; leave room for a small, busy host."""
EXTERNAL_PREFECT_TIMEOUT = 10.0
WORKER_START_TIMEOUT = 60.0
API_START_TIMEOUT = 60.0
RUNG_WORKER_QUERY_SECONDS = 10
"""How often serve's worker polls Prefect (``PREFECT_WORKER_QUERY_SECONDS``, unless set): the API on its host rings
its doorbell for every pull, so the poll finds only scheduled runs and retries. Polling every second, as a worker
on another host does, cost the Prefect server a fortieth of a core while the gateway stood idle."""
DEPLOY_TIMEOUT = 120.0
"""Registering the deployments imports Prefect and talks to the server: seconds on a busy small host."""


class _Stopped(Exception):
    """SIGINT or SIGTERM arrived while a part was starting."""


@dataclass
class Child:
    """A started part of the gateway, in its own session and process group."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, name: str, command: list[str], log: Path, env: dict[str, str]) -> Child:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as output:
            output.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} imagegw serve starts {name}\n".encode())
            output.flush()
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output,
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                       preexec_fn=dying_with_this_process())
        return cls(name, process, log)

    def exited(self) -> bool:
        return self.process.poll() is not None

    def failure(self, problem: str) -> ServiceUnavailable:
        """An error naming the part, what went wrong, and the end of its log."""
        tail = log_tail(self.log, 15) or "(no log)"
        return ServiceUnavailable(f"{self.name} {problem}; the end of {self.log}:\n{tail}")

    def stop(self) -> None:
        """SIGTERM the part's process groups, then SIGKILL whatever is left after STOP_TIMEOUT.

        A Prefect worker starts each flow run in a session of its own, which a signal to the
        worker's group would miss: the groups of all its descendants are signalled too.
        """
        groups = {self.process.pid, *_process_groups(descendants(self.process.pid))}
        _signal_groups(groups, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            self.process.poll()  # reap the leader, or its group never looks empty
            if not any(_group_alive(group) for group in groups):
                break
            time.sleep(0.05)
        # Also reaches what the leader left behind (flow runs, server workers), and what started meanwhile.
        _signal_groups(groups | _process_groups(descendants(self.process.pid)), signal.SIGKILL)
        self.process.wait()


def _process_groups(pids: set[int]) -> set[int]:
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    return groups


def _signal_groups(groups: set[int], signum: int) -> None:
    for group in groups:
        try:
            os.killpg(group, signum)
        except ProcessLookupError:
            pass


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


class Children:
    """The parts ``serve`` started, each owned from its spawn on, so none outlives ``serve``."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop  # set by SIGINT/SIGTERM: a part still starting is given up, a running one stopped
        self.started: list[Child] = []

    def spawn(self, name: str, command: list[str], log: Path, env: dict[str, str]) -> Child:
        child = Child.start(name, command, log, env)
        self.started.append(child)
        return child

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str,
                   child: Child | None = None) -> None:
        """Poll ``ready`` until it holds; ``what`` names the awaited thing, ``child`` the part providing it."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.stop.is_set():
                raise _Stopped
            if child is not None and child.exited():
                raise child.failure(f"exited with status {child.process.returncode} while starting")
            if time.monotonic() > deadline:
                if child is None:
                    raise ServiceUnavailable(f"{what} did not answer within {timeout:.0f} s")
                raise child.failure(f"was not ready within {timeout:.0f} s (waited for {what})")
            self.stop.wait(0.25)

    def supervise(self) -> int:
        """Wait for a stop request: 0; or for a part to exit on its own: 1, and the others go down too."""
        while not self.stop.wait(0.5):
            for child in self.started:
                if child.exited():
                    print(f"imagegw: {child.failure(f'exited with status {child.process.returncode}')}",
                          file=sys.stderr, flush=True)
                    return 1
        return 0

    def stop_all(self) -> None:
        """Stop the parts in the reverse order of their start: each may still be using the ones before it."""
        for child in reversed(self.started):
            child.stop()


def serve(settings: Settings, *, host: str, port: int, prefect_port: int) -> int:
    """Run the gateway's parts until SIGINT or SIGTERM; 0 after a clean shutdown, 1 if a part died."""
    children = Children(_stop_requested_by_signals())
    recorded: Path | None = None
    try:
        _check_free(host, port, "the API (--port)")
        print(f"database {_database(settings)}", flush=True)
        api_url = os.environ.get("PREFECT_API_URL")
        if api_url:
            children.wait_until(lambda: prefect_healthy(api_url), EXTERNAL_PREFECT_TIMEOUT,
                                f"the Prefect server at {api_url} (PREFECT_API_URL)")
            print(f"Prefect UI {_ui_url(api_url)} (PREFECT_API_URL)", flush=True)
        else:
            api_url = _start_prefect_server(children, settings, prefect_port)
            print(f"Prefect UI {_ui_url(api_url)}", flush=True)
            if not prefect_wants_csrf_tokens(api_url):
                # Each new Prefect client asks for a token before its first change unless told not to: one request
                # more in every pull's API call and in every run's start, each refused by this server.
                os.environ.setdefault("PREFECT_CLIENT_CSRF_SUPPORT_ENABLED", "false")
        os.environ["PREFECT_API_URL"] = api_url
        recorded = record_served_prefect_api(settings, api_url)
        _deploy(children, settings)
        _start_worker(children, settings)
        print(f"worker for platforms {', '.join(settings.platforms)}", flush=True)
        _start_api(children, settings, host, port)
        print(f"API http://{_url_host(host)}:{port} (docs /docs)", flush=True)
        print(f"ready; logs in {_log_dir(settings)}; Ctrl-C stops everything", flush=True)
        return children.supervise()
    except _Stopped:
        return 0
    finally:
        if recorded is not None:  # not otherwise: it may be another serve's, which this one failed to join
            # Before the server stops: a pull starting meanwhile then starts its own rather than find it gone.
            recorded.unlink(missing_ok=True)
        # The embedded database stops last, when this process exits (imagegw.store.embedded registers that).
        children.stop_all()


def _stop_requested_by_signals() -> threading.Event:
    """An event set by SIGINT/SIGTERM, so a shutdown is never cut short by the signal that asked for it."""
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    return stop


def _database(settings: Settings) -> str:
    """The image index's URI and where it came from; starts the embedded server when none is configured."""
    if settings.mongodb_uri is not None:
        source = MONGODB_URI_ENV if os.environ.get(MONGODB_URI_ENV) else "MongoDBURI"
        return f"{_without_password(settings.mongodb_uri)} ({source})"
    # Exports IMAGEGW_MONGODB_URI, which every child then inherits.
    return f"{ensure_embedded_server(settings.state_dir).uri} (embedded)"


def _start_prefect_server(children: Children, settings: Settings, port: int) -> str:
    """Start a Prefect server with its UI on loopback and return its API URL once healthy."""
    _check_free("127.0.0.1", port, "the Prefect server (--prefect-port)")
    env = {
        **os.environ,
        "PREFECT_HOME": str(settings.state_dir / "prefect"),
        # Through the environment, not --port: the UI reads its API address from these settings.
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    env.pop("PREFECT_API_URL", None)
    server = children.spawn("the Prefect server", [sys.executable, "-m", "prefect", "server", "start"],
                            _log_dir(settings) / "prefect-server.log", env)
    api_url = f"http://127.0.0.1:{port}/api"
    children.wait_until(lambda: prefect_healthy(api_url), PREFECT_START_TIMEOUT, f"{api_url}/health", server)
    return api_url


def _deploy(children: Children, settings: Settings) -> None:
    """``imagegw deploy``: every platform's work pool and deployment registered before any worker starts."""
    deploy = children.spawn("imagegw deploy", _imagegw("deploy", "--config", str(settings.source)),
                            _log_dir(settings) / "deploy.log", dict(os.environ))
    children.wait_until(lambda: deploy.exited(), DEPLOY_TIMEOUT, "the deployments to be registered")
    if deploy.process.returncode != 0:
        raise deploy.failure(f"exited with status {deploy.process.returncode}")
    children.started.remove(deploy)


def _start_worker(children: Children, settings: Settings) -> None:
    api_url = os.environ["PREFECT_API_URL"]
    environment = {"PREFECT_WORKER_QUERY_SECONDS": str(RUNG_WORKER_QUERY_SECONDS), **os.environ}
    worker = children.spawn("the worker", _imagegw("worker", "--config", str(settings.source)),
                            _log_dir(settings) / "worker.log", environment)
    # Ready once a worker polls every platform's pool: a triggered pull then starts within a poll.
    children.wait_until(lambda: all(_pool_ready(api_url, name) for name in settings.platforms),
                        WORKER_START_TIMEOUT, "a worker on every platform's work pool", worker)


def _start_api(children: Children, settings: Settings, host: str, port: int) -> None:
    command = _imagegw("api", "--config", str(settings.source), "--host", host, "--port", str(port))
    api = children.spawn("the API", command, _log_dir(settings) / "api.log", dict(os.environ))
    children.wait_until(lambda: listening(_connect_host(host), port), API_START_TIMEOUT,
                        f"a listener on {host}:{port}", api)


def _imagegw(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "cli", *arguments]


def _pool_ready(api_url: str, platform: str) -> bool:
    """Whether the Prefect server counts a worker of ``platform``'s pool as online."""
    answer = prefect_answer(f"{api_url}/work_pools/{quote(work_pool_name(platform), safe='')}/workers/filter", b"{}")
    return answer is not None and any(worker.get("status") == "ONLINE" for worker in json.loads(answer))


def _check_free(host: str, port: int, what: str) -> None:
    """Refuse a taken port up front: a health check would otherwise be answered by whatever holds it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As the servers themselves do, so a port in TIME_WAIT is not taken for a busy one.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ServiceUnavailable(f"cannot listen on {host}:{port} for {what}: {exc.strerror}") from None


def _connect_host(host: str) -> str:
    """Where to reach a server bound to ``host``: a wildcard address is reached on loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _ui_url(api_url: str) -> str:
    return api_url.removesuffix("/").removesuffix("/api")


def _without_password(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def _log_dir(settings: Settings) -> Path:
    return settings.state_dir / "logs"
