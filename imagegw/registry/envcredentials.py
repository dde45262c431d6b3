"""Registry credentials from environment variables: imgpkg's ``IMGPKG_REGISTRY_*`` scheme, without its surprises.

Variables
    ``IMAGEGW_REGISTRY_HOSTNAME_<SUFFIX>`` names a registry; ``…_USERNAME_<SUFFIX>`` with
    ``…_PASSWORD_<SUFFIX>``, or ``…_IDENTITY_TOKEN_<SUFFIX>``, or ``…_REGISTRY_TOKEN_<SUFFIX>`` is how
    to log in to it. The suffix (any text, compared exactly) pairs them; the variables without one
    form one more set. ``IMGPKG_REGISTRY_*`` is read the same way, so a site's imgpkg environment
    works unchanged. A set under each prefix is an entry of its own, even with the same suffix:
    the two meet only when they name the same registry, which is the conflict error below.

Hostnames
    ``name[:port]`` (``*`` and ``?`` glob within one label, as in :mod:`imagegw.hostglob`; ``*`` as
    the port matches any), optionally with an ``http://`` or ``https://`` scheme (dropped:
    credentials do not depend on it), a leading ``/v1/`` or ``/v2/`` (the API root, dropped), and a
    repository path (``gcr.io/team/app``) that matches whole path components: ``team/app`` and
    ``team/app/sub``, never ``team/app2``. ``docker.io``, ``index.docker.io``,
    ``registry-1.docker.io`` and ``registry.hub.docker.com`` are all Docker Hub: a hostname
    matching any of them matches a Docker Hub image, whichever of them the image names.

Precedence, when several entries match an image (first wins):
    1. more path components first (``gcr.io/team/app`` before ``gcr.io/team`` before ``*.io``);
    2. an exact host before a glob;
    3. among globs, the one with more literal characters (``*.example.com`` before ``*.*.com``);
    4. then by the hostname variable's name, only so that the order never depends on the environment's.
    Two entries naming the same host and path are an error rather than a coin toss.

Errors (:class:`ConfigError`, raised once, at load, naming the variable; never showing a secret):
an unknown variable under either prefix, an empty variable, a hostname that does not parse, a
hostname with no credential or a credential with no hostname, a username without a password (or
the reverse), more than one kind of credential in a set, two sets for the same host and path.

Where imgpkg differs, and why we do not follow it: it matches paths as string prefixes (so
``team/app`` took ``team/app2``), compares hostnames case-sensitively, matches ``docker.io`` to
nothing, treats ``?`` as the start of a URL query, lets an unpaired ``USERNAME`` shadow every other
credential, never matches an empty hostname, and picks among duplicates by map order.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass

from imagegw.config import DOCKER_HUB_HOSTS
from imagegw.errors import ConfigError
from imagegw.hostglob import host_matches, is_glob, split_port
from imagegw.registry.credentials import Credential

PREFIXES = ("IMAGEGW_REGISTRY_", "IMGPKG_REGISTRY_")
_HOSTNAME = "HOSTNAME"
_FIELDS = (_HOSTNAME, "USERNAME", "PASSWORD", "IDENTITY_TOKEN", "REGISTRY_TOKEN")
_NOT_CREDENTIALS = {"IMGPKG_REGISTRY_AZURE_CR_CONFIG"}
"""imgpkg's own setting for its Azure keychain: part of a working imgpkg environment, not an error here."""

_LABEL = r"[A-Za-z0-9*?-]+"
_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*|\[[0-9A-Fa-f:.]+\]")
_PORT = re.compile(r"[0-9]{1,5}|\*")
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
"""A repository path component, as the distribution spec writes it (lower case only)."""
_API_ROOTS = ("v1/", "v2/")
_DOCKER_HUB = "docker.io"


@dataclass(frozen=True)
class _Entry:
    """One set of variables: the registry (and repository path) it is for, and its credential."""

    host: str
    """``name[:port]``, lower case; may be a glob."""
    path: tuple[str, ...]
    variable: str
    """The hostname variable, for messages."""
    credential: Credential

    @property
    def target(self) -> tuple[str, tuple[str, ...]]:
        """What the entry names, Docker Hub's aliases made one, to find two entries naming the same."""
        return (_DOCKER_HUB if self.host in DOCKER_HUB_HOSTS else self.host), self.path

    @property
    def precedence(self) -> tuple[int, bool, int, str]:
        """Sort key: lower is tried first (the module docstring's order)."""
        literal = sum(character not in "*?" for character in self.host)
        return -len(self.path), is_glob(self.host), -literal, self.variable

    def matches(self, host: str, path: tuple[str, ...]) -> bool:
        """Whether the entry is for repository ``path`` on registry ``host``."""
        names = DOCKER_HUB_HOSTS if host.lower() in DOCKER_HUB_HOSTS else {host}
        return path[:len(self.path)] == self.path and any(host_matches(self.host, name) for name in names)


@dataclass(frozen=True)
class EnvironmentCredentials:
    """The registry credentials environment variables give, in the order they are tried."""

    _entries: tuple[_Entry, ...]

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> EnvironmentCredentials:
        """The credentials in ``env`` (pass ``os.environ``), checked; :class:`ConfigError` names a bad variable."""
        entries = [_entry(prefix, suffix, values) for (prefix, suffix), values in sorted(_sets(env).items())]
        _refuse_duplicates(entries)
        return cls(tuple(sorted(entries, key=lambda entry: entry.precedence)))

    def credential_for(self, host: str, repository: str) -> Credential | None:
        """The credential for ``repository`` (``team/app``) on ``host`` (``name[:port]``); None if no variable is."""
        path = tuple(repository.split("/"))
        return next((entry.credential for entry in self._entries if entry.matches(host, path)), None)


def _sets(env: Mapping[str, str]) -> dict[tuple[str, str], dict[str, str]]:
    """The credential variables in ``env``, by (prefix, suffix), each set's values by field."""
    sets: dict[tuple[str, str], dict[str, str]] = {}
    for name, value in env.items():
        parsed = _parse_name(name)
        if parsed is None:
            continue
        prefix, field, suffix = parsed
        if not value:
            raise _fail(name, "is empty (unset it, or give it a value)")
        sets.setdefault((prefix, suffix), {})[field] = value
    return sets


def _parse_name(name: str) -> tuple[str, str, str] | None:
    """(prefix, field, suffix) of a credential variable; None for a variable that is not one."""
    prefix = next((prefix for prefix in PREFIXES if name.startswith(prefix)), None)
    if prefix is None or name in _NOT_CREDENTIALS:
        return None
    rest = name[len(prefix):]
    for field in _FIELDS:
        if rest == field:
            return prefix, field, ""
        # ``HOSTNAME_`` with nothing after it is refused below, not taken for the unsuffixed set.
        if rest.startswith(field + "_") and len(rest) > len(field) + 1:
            return prefix, field, rest[len(field) + 1:]
    # Misspellings such as HOSTNAMEX would otherwise leave a registry silently without its credential.
    raise _fail(name, f"is not a registry credential variable (want {prefix}<FIELD> or {prefix}<FIELD>_<suffix>, "
                      f"<FIELD> one of {', '.join(_FIELDS)})")


def _entry(prefix: str, suffix: str, values: Mapping[str, str]) -> _Entry:
    """The entry one set of variables makes; :class:`ConfigError` when the set is incomplete or ambiguous."""
    hostname_variable = _variable(prefix, _HOSTNAME, suffix)
    if _HOSTNAME not in values:
        first = _variable(prefix, sorted(values)[0], suffix)
        raise _fail(first, f"has no {hostname_variable} to say which registry it is for")
    host, path = _parse_hostname(hostname_variable, values[_HOSTNAME])
    credential = _credential(prefix, suffix, values)
    return _Entry(host, path, hostname_variable, credential)


def _credential(prefix: str, suffix: str, values: Mapping[str, str]) -> Credential:
    """The credential of one set: a username and password, an identity token, or a registry token; one of them."""
    username, password = values.get("USERNAME"), values.get("PASSWORD")
    if (username is None) != (password is None):
        given, missing = ("USERNAME", "PASSWORD") if password is None else ("PASSWORD", "USERNAME")
        raise _fail(_variable(prefix, given, suffix), f"is set but {_variable(prefix, missing, suffix)} is not")
    kinds = [kind for kind in ("USERNAME", "IDENTITY_TOKEN", "REGISTRY_TOKEN") if kind in values]
    hostname_variable = _variable(prefix, _HOSTNAME, suffix)
    if not kinds:
        raise _fail(hostname_variable, f"has no credential with it: set {_variable(prefix, 'USERNAME', suffix)} and "
                                       f"…PASSWORD{_tail(suffix)}, …IDENTITY_TOKEN{_tail(suffix)} or "
                                       f"…REGISTRY_TOKEN{_tail(suffix)}")
    if len(kinds) > 1:
        # Which one a registry would get would depend on its challenge: say which is meant instead.
        named = " and ".join(_variable(prefix, kind, suffix) for kind in kinds)
        raise _fail(hostname_variable, f"has more than one kind of credential ({named}); keep one")
    return Credential(source=_source(prefix, suffix), username=username, password=password,
                      identity_token=values.get("IDENTITY_TOKEN"), registry_token=values.get("REGISTRY_TOKEN"))


def _parse_hostname(variable: str, value: str) -> tuple[str, tuple[str, ...]]:
    """(``name[:port]`` lower case, repository path components) of a hostname variable's value."""
    rest = value
    if "://" in value:
        scheme, rest = value.split("://", 1)
        if scheme.lower() not in ("http", "https"):
            raise _fail(variable, f"{value!r}: the scheme can only be http or https")
    host, _, path = rest.partition("/")
    return _parse_host(variable, value, host), _parse_path(variable, value, path)


def _parse_host(variable: str, value: str, host: str) -> str:
    """``name[:port]``, checked, in lower case."""
    name, port = split_port(host)
    if not _NAME.fullmatch(name) or host != name + (":" + port if port else ""):
        raise _fail(variable, f"{value!r}: {host!r} is not a registry host (want name[:port], '*' or '?' "
                              f"globbing within a label, or [IPv6]:port)")
    if name.startswith("["):
        try:
            ipaddress.IPv6Address(name[1:-1])
        except ValueError:
            raise _fail(variable, f"{value!r}: {name} is not an IPv6 address") from None
    if port and (not _PORT.fullmatch(port) or (port != "*" and not 0 < int(port) < 65536)):
        raise _fail(variable, f"{value!r}: {port!r} is not a port (want 1-65535, or '*' for any)")
    return host.lower()


def _parse_path(variable: str, value: str, path: str) -> tuple[str, ...]:
    """The repository path components after the host: ``/v1/`` or ``/v2/`` first and a trailing ``/`` ignored."""
    if path.startswith(_API_ROOTS):
        path = path.split("/", 1)[1]
    components = path.split("/")
    if components[-1] == "":
        components.pop()
    for component in components:
        if not _COMPONENT.fullmatch(component):
            raise _fail(variable, f"{value!r}: {component!r} is not a repository path component (lower-case "
                                  f"letters and digits, separated by '.', '_', '__' or '-')")
    return tuple(components)


def _refuse_duplicates(entries: list[_Entry]) -> None:
    """:class:`ConfigError` when two entries name the same host and path: which one won would be a guess."""
    seen: dict[tuple[str, tuple[str, ...]], _Entry] = {}
    for entry in entries:
        earlier = seen.setdefault(entry.target, entry)
        if earlier is not entry:
            raise _fail(f"{earlier.variable} ({_shown(earlier)}) and {entry.variable} ({_shown(entry)})",
                        "both name the same registry and repository path; keep one")


def _shown(entry: _Entry) -> str:
    return "/".join((entry.host, *entry.path))


def _variable(prefix: str, field: str, suffix: str) -> str:
    return f"{prefix}{field}{_tail(suffix)}"


def _tail(suffix: str) -> str:
    return f"_{suffix}" if suffix else ""


def _source(prefix: str, suffix: str) -> str:
    """What :attr:`Credential.source` says: the variables, never their values."""
    return f"environment {prefix}*_{suffix}" if suffix else f"environment {prefix}* (unsuffixed)"


def _fail(variable: str, problem: str) -> ConfigError:
    return ConfigError(f"{variable} in the environment: {problem}")
