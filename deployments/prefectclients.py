"""How the Prefect API clients of the gateway's processes behave, where Prefect's own behaviour cost seconds.

- **One TLS context per CA bundle, instead of one per client.** Prefect's ``PrefectClient`` builds a new
  ``ssl.SSLContext`` from its CA bundle (certifi's, or ``PREFECT_API_SSL_CERT_FILE``) each time one is made,
  whatever the API's scheme: 30 ms of parsing certificates here. Prefect's own code makes clients freely: a worker
  about five for each flow run it submits, the run's process about ten more, the API one per pull it starts.
  Profiled, that was a third of the time between a pull's request and its flow running. A verifying context is
  never changed once made, and one context may serve any number of connections.
- **A 503 is tried again within a moment, not after 2 s.** On SQLite, Prefect's server answers 503 when a request
  that read the database finds, as it comes to write, that another writer took it since (the previous run's last
  records, often): the request was rolled back, and succeeds when made again. Prefect's client waits 2 s, then
  4, 8...: in runs of pulls one after another, that wait was in one pull in two, in the API's creation of the run,
  the worker's submission or the run's own calls. Each answer 503 is given a ``Retry-After`` of
  :data:`QUICK_RETRY_DELAYS`; past those tries, Prefect's own back-off takes over (16 s, then 32 s).

- **The server's version checked once per fork server, not once per run.** Prefect checks the API's version the first
  time a process uses a client, and remembers it for the process. The warm worker's fork server checks before it
  forks (:func:`check_prefect_server_version`), so that each run's process, forked from it, remembers it too: two
  requests fewer as each run starts.

The first two replace names in Prefect's client module (private details: the ``ssl`` module and the two httpx client
classes); the third calls the private check of Prefect's event clients. All are checked against the pinned Prefect
(``pyproject.toml``) by ``tests/test_prefectclients.py``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
import types
import weakref
from typing import Any

import certifi
import httpx
import prefect.client.orchestration as _clients
from prefect._internal.version_checking import check_server_version
from prefect.client.base import PrefectHttpxAsyncClient, PrefectHttpxSyncClient
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_SSL_CERT_FILE, get_current_settings

SERVER_BUSY = 503
QUICK_RETRY_DELAYS = (0.05, 0.2, 0.8)
"""Seconds before the 2nd, 3rd and 4th tries of a request answered 503."""


def tune_prefect_clients() -> None:
    """From now on, this process's Prefect clients share their TLS context and try a 503 again at once (idempotent)."""
    if not isinstance(_clients.ssl, _SharingSSL):  # type: ignore[attr-defined]
        _clients.ssl = _SharingSSL()  # type: ignore[attr-defined,assignment]
    _clients.PrefectHttpxAsyncClient = _QuickRetryAsyncClient  # type: ignore[attr-defined]
    _clients.PrefectHttpxSyncClient = _QuickRetrySyncClient  # type: ignore[attr-defined]


def make_tls_context() -> ssl.SSLContext:
    """Make now the TLS context this process's Prefect clients will use (50–70 ms): in a process that is forked from
    (the warm worker's fork server), each child then finds it made."""
    return _verifying_context(ssl.Purpose.SERVER_AUTH, PREFECT_API_SSL_CERT_FILE.value() or certifi.where())


def check_prefect_server_version() -> None:
    """Check, as Prefect's clients do once per process, that the Prefect API named in the settings is of a version
    this Prefect can use (:class:`RuntimeError` if not, or if it does not answer); no request without an API URL."""
    api_url = get_current_settings().api.url
    if not api_url:
        return
    with get_client(sync_client=True) as client:
        client.raise_for_api_version_mismatch_once()
    # Prefect's event and log clients check it too, but remember it under the API's address as configured (the HTTP
    # clients, under the address with a final slash).
    asyncio.run(check_server_version(api_url, logging.getLogger(__name__)))


class _SharingSSL(types.SimpleNamespace):
    """The ``ssl`` module, but ``create_default_context(cafile=...)`` gives one context per file."""

    def __getattr__(self, name: str) -> Any:
        return getattr(ssl, name)

    @staticmethod
    def create_default_context(purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH, *, cafile: str | None = None,
                               capath: str | None = None, cadata: str | bytes | None = None) -> ssl.SSLContext:
        if cafile is None or capath is not None or cadata is not None:
            # Prefect's "skip verification" context is changed after it is made: never shared.
            return ssl.create_default_context(purpose, cafile=cafile, capath=capath, cadata=cadata)
        return _verifying_context(purpose, cafile)


@functools.lru_cache(maxsize=8)
def _verifying_context(purpose: ssl.Purpose, cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(purpose, cafile=cafile)


_busy_answers: weakref.WeakKeyDictionary[httpx.Request, int] = weakref.WeakKeyDictionary()
"""How many times each request in flight was answered 503: Prefect's client sends the same request again."""


def _retry_soon_if_busy(response: httpx.Response) -> None:
    if response.status_code != SERVER_BUSY or "Retry-After" in response.headers:
        return
    answers = _busy_answers.get(response.request, 0)
    _busy_answers[response.request] = answers + 1
    if answers < len(QUICK_RETRY_DELAYS):
        response.headers["Retry-After"] = str(QUICK_RETRY_DELAYS[answers])


async def _retry_soon_if_busy_async(response: httpx.Response) -> None:
    _retry_soon_if_busy(response)


class _QuickRetryAsyncClient(PrefectHttpxAsyncClient):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.event_hooks["response"].append(_retry_soon_if_busy_async)


class _QuickRetrySyncClient(PrefectHttpxSyncClient):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.event_hooks["response"].append(_retry_soon_if_busy)
