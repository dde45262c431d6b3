"""One TLS context per CA bundle for all of a process's Prefect API clients, instead of one per client.

Prefect's ``PrefectClient`` builds a new ``ssl.SSLContext`` from its CA bundle (certifi's, or
``PREFECT_API_SSL_CERT_FILE``) each time one is made, whatever the API's scheme: 30 ms of parsing
certificates here. Prefect's own code makes clients freely: a worker about five for each flow run it
submits, the run's process about ten more, the API one per pull it starts. Profiled, that was a third
of the time between a pull's request and its flow running. A verifying context is never changed once
made, and one context may serve any number of connections, so a process shares one per CA file.

This replaces the ``ssl`` name in Prefect's client module (a private detail): checked against the
pinned Prefect (``pyproject.toml``) by ``tests/test_tlscontexts.py``.
"""

from __future__ import annotations

import functools
import ssl
import types
from typing import Any

import prefect.client.orchestration as _clients


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


def share_tls_contexts() -> None:
    """From now on, this process's Prefect clients share their TLS context (idempotent)."""
    if not isinstance(_clients.ssl, _SharingSSL):  # type: ignore[attr-defined]
        _clients.ssl = _SharingSSL()  # type: ignore[attr-defined,assignment]
