"""pytest plugin: session-scoped local registries.

Load it from ``tests/conftest.py`` with ``pytest_plugins = ["testsupport.fixtures"]``.

Fixtures:
    registry:        anonymous plain-HTTP registry.
    basic_registry:  htpasswd Basic auth, user alice / s3cr3t (``.credentials``).
    token_registry:  token auth through a :class:`TokenServer` with alice / s3cr3t;
                     anonymous pull allowed (``.token_server`` for assertions).
    ssh_user_keys:   RSA, ed25519, ECDSA and passphrase-protected ed25519 client keys (session).
    sshd:            a loopback sshd accepting ``ssh_user_keys``, as an :class:`SshServer` (session).
    private_sshd:    the same, but a server of the test's own, free to ``kill_sessions()`` or ``stop()``.
    postgres:        a throw-away PostgreSQL on a loopback port with a ``prefect`` database (session);
                     ``.url`` is the SQLAlchemy URL a Prefect server takes.

A missing ``docker-registry`` fails the tests with the install hint; only the ssh fixtures
skip, when ``/usr/sbin/sshd`` is not installed, and ``postgres``, when PostgreSQL is not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from testsupport.munge import MungedStartError, RunningMunged
from testsupport.postgres import INSTALL_HINT as POSTGRES_INSTALL_HINT
from testsupport.postgres import INSTALL_ROOT as POSTGRES_INSTALL_ROOT
from testsupport.postgres import PostgresStartError, RunningPostgres, postgres_installed
from testsupport.registry import RegistryStartError, RunningRegistry
from testsupport.service import StoppedOnExit
from testsupport.sshd import INSTALL_HINT as SSHD_INSTALL_HINT
from testsupport.sshd import SSHD_BINARY, SshdStartError, SshServer, UserKeys, sshd_installed
from testsupport.tokenserver import TokenServer

TEST_USER = "alice"
TEST_PASSWORD = "s3cr3t"
TEST_USERS = {TEST_USER: TEST_PASSWORD}

T = TypeVar("T")
S = TypeVar("S", bound=StoppedOnExit)


def _started(start: Callable[[], T], error: type[Exception]) -> T:
    """``start()``, its ``error`` turned into a test failure with the message alone.

    The message says what went wrong (install hint, log tail); a traceback into
    testsupport would only hide it.
    """
    try:
        return start()
    except error as exc:
        pytest.fail(str(exc), pytrace=False)


def _serving(start: Callable[[], S], error: type[Exception]) -> Iterator[S]:
    """A fixture's body: the service from ``start()`` (as :func:`_started`) for the test(s), then stopped."""
    running = _started(start, error)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """An anonymous plain-HTTP registry for the whole session."""
    yield from _serving(lambda: RunningRegistry.start(tmp_path_factory.mktemp("registry")), RegistryStartError)


@pytest.fixture(scope="session")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """A registry requiring HTTP Basic auth (alice / s3cr3t)."""
    yield from _serving(
        lambda: RunningRegistry.start(tmp_path_factory.mktemp("basic-registry"), htpasswd_users=TEST_USERS),
        RegistryStartError,
    )


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """A registry using Docker token auth; alice / s3cr3t may push, anyone may pull."""
    workdir = tmp_path_factory.mktemp("token-registry")
    server = TokenServer.start(workdir / "token-server", TEST_USERS)
    try:
        yield from _serving(
            lambda: RunningRegistry.start(workdir / "registry", token_server=server), RegistryStartError
        )
    finally:
        server.stop()


@pytest.fixture(scope="session")
def munged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningMunged]:
    """A private munged for the whole session; ``.mint()`` credentials, decode on ``.socket_path``."""
    yield from _serving(lambda: RunningMunged.start(tmp_path_factory.mktemp("munged")), MungedStartError)


@pytest.fixture(scope="session")
def ssh_user_keys(tmp_path_factory: pytest.TempPathFactory) -> UserKeys:
    """Client keys for the whole session (RSA-3072 takes a while); skips all ssh tests without sshd."""
    if not sshd_installed():
        pytest.skip(f"{SSHD_BINARY} is not installed ({SSHD_INSTALL_HINT})")
    return _started(lambda: UserKeys.generate(tmp_path_factory.mktemp("ssh-keys")), SshdStartError)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory, ssh_user_keys: UserKeys) -> Iterator[SshServer]:
    """A shared loopback sshd accepting every key of ``ssh_user_keys``; do not stop it or kill its sessions."""
    yield from _serving(lambda: SshServer.start(tmp_path_factory.mktemp("sshd"), ssh_user_keys), SshdStartError)


@pytest.fixture
def private_sshd(tmp_path_factory: pytest.TempPathFactory, ssh_user_keys: UserKeys) -> Iterator[SshServer]:
    """An sshd for one test (other port and host key than ``sshd``), so it may cut connections or go down."""
    yield from _serving(
        lambda: SshServer.start(tmp_path_factory.mktemp("private-sshd"), ssh_user_keys), SshdStartError
    )


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPostgres]:
    """A private PostgreSQL for the whole session, with a ``prefect`` database; skips when it is not installed."""
    if not postgres_installed():
        pytest.skip(f"PostgreSQL is not installed in {POSTGRES_INSTALL_ROOT} ({POSTGRES_INSTALL_HINT})")
    yield from _serving(lambda: RunningPostgres.start(tmp_path_factory.mktemp("postgres")), PostgresStartError)
