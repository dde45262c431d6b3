"""Prefect API clients of a process share one TLS context per CA bundle (``deployments.tlscontexts``), checked
against the installed Prefect: its client module must still build its context the way the sharing expects."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
from prefect.client.orchestration import get_client
from deployments.tlscontexts import share_tls_contexts

def context(client):
    return client._client._transport._pool._ssl_context

before = context(get_client(sync_client=True)) is context(get_client(sync_client=True))
share_tls_contexts()
after = context(get_client(sync_client=True)) is context(get_client(sync_client=True)) is context(get_client())
print(before, after)
"""


def sharing_seen(**environment: str) -> list[str]:
    """Whether two clients shared a context before and after ``share_tls_contexts``, in a process of their own."""
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                            env={"PREFECT_API_URL": "http://127.0.0.1:9/api", "PATH": "/usr/bin:/bin", **environment})
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_clients_share_one_context_once_asked_to() -> None:
    assert sharing_seen() == ["False", "True"]


def test_a_context_that_skips_verification_is_never_shared() -> None:
    assert sharing_seen(PREFECT_API_TLS_INSECURE_SKIP_VERIFY="true") == ["False", "False"]
