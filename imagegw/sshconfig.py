"""A remote platform's SSH settings (``accesstype: remote``), read from Shifter's keys and checked.

Shifter's form loads unchanged::

    "host": ["login1", "login2:2222"],
    "ssh": {"username": "shifter", "key": "/home/shifter/.ssh/ssh.key", "imageDir": "/images"}

Shifter ran ``ssh``/``scp`` with ``sshCmdOptions``/``scpCmdOptions``; the options that mean
something to a gateway speaking SSH itself (a key, a port, host-key checking, a known-hosts file,
a connect timeout, a user) are mapped to the keys below, and any other is refused naming the key
to use instead. Host keys are checked unless ``hostKeyChecking`` is false: that is never a default.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagegw.errors import ConfigError

SSH_KEYS = {"username", "key", "imageDir", "knownHosts", "hostKeyChecking", "keyPassphrase", "keyPassphraseEnv",
            "connectTimeout", "timeout", "sshCmdOptions", "scpCmdOptions"}
DEFAULT_SSH_PORT = 22
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_TIMEOUT = 60.0
_NO_EFFECT_OPTIONS = {"-q", "-B", "-oBatchMode=yes"}
"""Options of ssh/scp that only matter to an interactive program: accepted, and they change nothing."""


@dataclass(frozen=True)
class SshHost:
    """One host of a remote platform, tried in the order configured."""

    name: str
    port: int = DEFAULT_SSH_PORT

    def __str__(self) -> str:
        return self.name if self.port == DEFAULT_SSH_PORT else f"{self.name}:{self.port}"


@dataclass(frozen=True)
class RemoteAccess:
    """How the gateway reaches a remote platform's image directory: SFTP to the first host that answers."""

    hosts: tuple[SshHost, ...]
    username: str
    key: Path | None
    """The private key (RSA, ed25519 or ECDSA); None: the gateway user's own keys in ``~/.ssh``."""
    known_hosts: Path
    """Where the hosts' keys are checked (``ssh.knownHosts``, else ``~/.ssh/known_hosts``)."""
    check_host_keys: bool = True
    key_passphrase: str | None = field(default=None, repr=False)
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    """Seconds to reach a host and log in; a host slower than that is skipped."""
    timeout: float = DEFAULT_TIMEOUT
    """Seconds any one SFTP operation may take before the connection counts as broken."""


Fail = Callable[[str, str], ConfigError]
"""Makes the error for ``(key, problem)``, naming the configuration file."""


def read_remote_access(platform: dict[str, Any], key: str, fail: Fail) -> tuple[RemoteAccess, str]:
    """The remote access of the platform ``platform`` (whose key is ``key``), and its ``ssh.imageDir``."""
    ssh = platform.get("ssh")
    if not isinstance(ssh, dict):
        raise fail(key + ".ssh", "is missing: a remote platform needs username, imageDir and usually key")
    for name in ssh:
        if name not in SSH_KEYS:
            raise fail(f"{key}.ssh.{name}", f"unknown key (known: {', '.join(sorted(SSH_KEYS))})")
    settings = dict(ssh)
    for option_key in ("sshCmdOptions", "scpCmdOptions"):
        settings.update(_mapped_options(settings.pop(option_key, []), f"{key}.ssh.{option_key}", fail))
    hosts = _hosts(platform.get("host"), settings.pop("port", None), key + ".host", fail)
    image_dir = settings.get("imageDir")
    if not isinstance(image_dir, str) or not image_dir.startswith("/"):
        raise fail(key + ".ssh.imageDir", f"must be an absolute path on the remote hosts, not {image_dir!r}")
    username = settings.get("username")
    if not isinstance(username, str) or not username:
        raise fail(key + ".ssh.username", "is missing: the account the gateway logs in as")
    return RemoteAccess(
        hosts=hosts,
        username=username,
        # Not required to exist here: the API host reads this file too, and only workers hold the key.
        key=_optional_path(settings.get("key"), key + ".ssh.key", fail),
        known_hosts=_optional_path(settings.get("knownHosts"), key + ".ssh.knownHosts", fail)
        or Path("~/.ssh/known_hosts").expanduser(),
        check_host_keys=_flag(settings.get("hostKeyChecking", True), key + ".ssh.hostKeyChecking", fail),
        key_passphrase=_passphrase(settings, key + ".ssh", fail),
        connect_timeout=_seconds(settings.get("connectTimeout", DEFAULT_CONNECT_TIMEOUT), key + ".ssh.connectTimeout",
                                 fail),
        timeout=_seconds(settings.get("timeout", DEFAULT_TIMEOUT), key + ".ssh.timeout", fail),
    ), image_dir


def _hosts(raw: Any, port: int | None, key: str, fail: Fail) -> tuple[SshHost, ...]:
    names = [raw] if isinstance(raw, str) else raw
    if not isinstance(names, list) or not names or not all(isinstance(name, str) and name for name in names):
        raise fail(key, "must list the hosts to publish through, e.g. [\"login1\", \"login2:2222\"]")
    hosts = []
    for name in names:
        host, colon, port_text = name.rpartition(":") if ":" in name else (name, "", "")
        if colon and not (port_text.isdigit() and 0 < int(port_text) < 65536):
            raise fail(key, f"{name!r} has a bad port")
        hosts.append(SshHost(host, int(port_text) if colon else port or DEFAULT_SSH_PORT))
    return tuple(hosts)


def _mapped_options(raw: Any, key: str, fail: Fail) -> dict[str, Any]:
    """Shifter's ssh/scp command-line options, as the ssh keys they stand for."""
    if not isinstance(raw, list) or not all(isinstance(option, str) for option in raw):
        raise fail(key, "must be a list of ssh options")
    words = shlex.split(" ".join(raw))
    mapped: dict[str, Any] = {}
    while words:
        word = words.pop(0)
        if word in _NO_EFFECT_OPTIONS:
            continue
        if word[:2] in ("-i", "-p", "-P", "-o"):
            value = word[2:] if len(word) > 2 else (words.pop(0) if words else "")
            if not value:
                raise fail(key, f"{word} needs a value")
            mapped.update(_mapped_option(word[:2], value, key, fail))
            continue
        raise fail(key, f"{word!r} has no meaning to the gateway's own SSH client; use the keys of the ssh "
                        f"section ({', '.join(sorted(SSH_KEYS - {'sshCmdOptions', 'scpCmdOptions'}))})")
    return mapped


def _mapped_option(flag: str, value: str, key: str, fail: Fail) -> dict[str, Any]:
    if flag == "-i":
        return {"key": value}
    if flag in ("-p", "-P"):
        return {"port": _port(value, key, fail)}
    name, _, setting = value.partition("=")
    by_name: dict[str, Callable[[str], dict[str, Any]]] = {
        "stricthostkeychecking": lambda v: {"hostKeyChecking": _strict(v, key, fail)},
        "userknownhostsfile": lambda v: {"knownHosts": v},
        "connecttimeout": lambda v: {"connectTimeout": _number(v, key, fail)},
        "identityfile": lambda v: {"key": v},
        "port": lambda v: {"port": _port(v, key, fail)},
        "user": lambda v: {"username": v},
        "batchmode": lambda v: {},
    }
    if name.lower() not in by_name or not setting:
        raise fail(key, f"-o {value} has no meaning to the gateway's own SSH client; the ssh section's keys "
                        "are knownHosts, hostKeyChecking, connectTimeout, timeout, key and username")
    return by_name[name.lower()](setting)


def _strict(value: str, key: str, fail: Fail) -> bool:
    if value.lower() in ("yes", "true"):
        return True
    if value.lower() in ("no", "false", "off"):
        return False
    raise fail(key, f"StrictHostKeyChecking={value}: unknown host keys are always refused; set ssh.knownHosts "
                    "to a file that holds them, or ssh.hostKeyChecking to false")


def _port(value: str, key: str, fail: Fail) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise fail(key, f"port {value!r} is not a port number")
    return int(value)


def _number(value: str, key: str, fail: Fail) -> float:
    try:
        return float(value)
    except ValueError:
        raise fail(key, f"{value!r} is not a number of seconds") from None


def _seconds(value: Any, key: str, fail: Fail) -> float:
    if isinstance(value, str):
        value = _number(value, key, fail)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise fail(key, f"must be a positive number of seconds, not {value!r}")
    return float(value)


def _flag(value: Any, key: str, fail: Fail) -> bool:
    if not isinstance(value, bool):
        raise fail(key, f"must be true or false, not {value!r}")
    return value


def _optional_path(value: Any, key: str, fail: Fail) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise fail(key, f"must be a file name, not {value!r}")
    return Path(value).expanduser()


def _passphrase(ssh: dict[str, Any], key: str, fail: Fail) -> str | None:
    """The key's passphrase: ``keyPassphrase`` itself, or the environment variable ``keyPassphraseEnv`` names."""
    if "keyPassphrase" in ssh and "keyPassphraseEnv" in ssh:
        raise fail(key + ".keyPassphrase", "give keyPassphrase or keyPassphraseEnv, not both")
    if "keyPassphraseEnv" in ssh:
        variable = ssh["keyPassphraseEnv"]
        if not isinstance(variable, str) or variable not in os.environ:
            raise fail(key + ".keyPassphraseEnv", f"the environment variable {variable!r} is not set")
        return os.environ[variable]
    passphrase = ssh.get("keyPassphrase")
    if passphrase is not None and not isinstance(passphrase, str):
        raise fail(key + ".keyPassphrase", "must be a string")
    return passphrase
