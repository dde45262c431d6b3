"""Registry host patterns, as operators write them in ``AllowedRegistries`` and credential variables.

A pattern is ``name[:port]`` whose dot-separated labels may be shell globs (``*``, ``?``, ``[...]``),
each matching one label: ``*.example.com`` matches ``a.example.com``, not ``a.b.example.com``
(write ``*.*.example.com``). Ports must be equal (``*`` as the port matches any, and no port matches
only no port). Host names are compared without regard to case, as DNS does.
"""

from __future__ import annotations

from fnmatch import fnmatchcase


def split_port(host: str) -> tuple[str, str]:
    """(``name``, ``port``) of ``name[:port]``; IPv6 literals keep their brackets; no port is ``""``."""
    if host.startswith("["):
        end = host.find("]")
        return host[:end + 1], host[end + 2:] if host[end + 1:end + 2] == ":" else ""
    name, _, port = host.partition(":")
    return name, port


def host_matches(pattern: str, host: str) -> bool:
    """Whether registry ``host`` matches ``pattern`` (see the module's rules)."""
    pattern_name, pattern_port = split_port(pattern.lower())
    name, port = split_port(host.lower())
    if pattern_port not in (port, "*"):
        return False
    if pattern_name.startswith("["):
        return pattern_name == name
    wanted, labels = pattern_name.split("."), name.split(".")
    return len(wanted) == len(labels) and all(fnmatchcase(label, glob) for glob, label in zip(wanted, labels))


def is_glob(pattern: str) -> bool:
    """Whether ``pattern`` has a wildcard (an exact host beats one)."""
    return any(character in pattern for character in "*?[")
