"""Read and validate ``imagemanager.json`` (Shifter's format) once.

Every problem is a :class:`ConfigError` that names the key and the file, so an
operator can fix it without reading code. Full-line ``//`` comments are
allowed, so the example in ``config/`` can explain itself; anything else is
plain JSON and Shifter's files load unchanged.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from imagegw.errors import ConfigError, LimitExceeded, UnknownPlatform
from imagegw.hostglob import host_matches
from imagegw.sshconfig import RemoteAccess, read_remote_access

CONFIG_ENV = "IMAGEGW_CONFIG"
STATE_DIR_ENV = "IMAGEGW_STATE_DIR"
MONGODB_URI_ENV = "IMAGEGW_MONGODB_URI"

# Every kernel with squashfs, and every squashfuse, mounts gzip; level 1 builds much faster than
# level 6 for images only slightly larger (README, "Compression").
DEFAULT_COMPRESSION = "gzip:1"
DEFAULT_BLOCK_SIZE = 131072
# Each pull converts on every core of the host that runs it: two at a time keep a small host busy
# without making each pull wait for the others.
DEFAULT_MAX_CONCURRENT_PULLS = 2
DEFAULT_EXPIRE_SCHEDULE = "0 * * * *"
"""Hourly: an expired image's files go within the hour, and each pass has little to do."""
DEFAULT_REGISTRY_TIMEOUT = 60.0
"""Seconds a registry may stay silent (before it answers, or in the middle of a blob) before the request
counts as failed and is retried: a registry under load, or a blob store behind it, can pause for tens of seconds."""
DEFAULT_STALE_PULL_TIMEOUT = 180
"""Seconds a running pull's record may go without a heartbeat before the pull counts as dead (its process
killed, its host down) and a new request starts it again. Long enough that a busy host or database delaying
a few beats is never taken for a dead pull: a live pull taken over would be pulled twice at once."""
BEATS_PER_STALE_PULL_TIMEOUT = 6
"""A running pull beats its record this many times within StalePullTimeout: it counts as dead only after
missing that many beats in a row."""
DEFAULT_API_WORKERS = 2
"""A lookup spends about half its time waiting for the database; a second process answers meanwhile
(bench/README.md, "Lookups under load")."""
MAX_API_WORKERS = 64
DEFAULT_REFRESH_SCHEDULE = "*/15 * * * *"
"""A tag unchanged costs one HEAD request; a quarter hour keeps a pushed watched tag from waiting long
where the registry sends no notifications."""
MIN_SECRET_LENGTH = 16
"""Of NotifySecret: a registry's notifications start pulls, so the secret must not be guessable."""
# The cache shares its disk with the squashfs files being built and the gateway's state: a quarter
# of it keeps plenty of layers without crowding them out. Relative, so it fits whatever disk holds it.
DEFAULT_CACHE_SIZE_PERCENT = 25
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?|%)", re.IGNORECASE)
COMPRESSORS = {"gzip": range(1, 10), "xz": range(0, 10), "zstd": range(1, 23), "lz4": range(0, 1)}

# Keys Shifter's gateway reads (or once read) that we accept and do not use, so
# an existing imagemanager.json loads unchanged.
_SHIFTER_KEYS_IGNORED = {
    "WorkerThreads", "LogLevel", "ConverterOptions", "ConvertOptions",
    "examiner", "Broker", "DefaultLustreReplication", "DefaultOstCount", "Authentication",
    "usergroupService", "mountCommand",
}
_TOP_LEVEL_KEYS = {
    "DefaultImageLocation", "DefaultImageFormat", "PullUpdateTimeout", "PullUpdateTime",
    "ImageExpirationTimeout", "MongoDBURI", "MongoDB", "CacheDirectory", "ExpandDirectory",
    "StateDirectory", "Compression", "BlockSize", "Locations", "Platforms", "Metrics", "ImportUsers",
    "ExpireSchedule", "CacheSizeLimit", "RefreshSchedule", "NotifySecret", "AllowedRegistries",
    "SealKeyFile", "Limits", "RegistryTimeout", "StalePullTimeout", "ApiWorkers",
} | _SHIFTER_KEYS_IGNORED
_LOCATION_KEYS = {"remotetype", "url", "sslcacert", "authMethod", "insecure", "username", "password",
                  "passwordFile", "passwordEnv", "iaas",
                  "authentication"}
_LIMIT_KEYS = {  # key in the file: (Limits field, whether it is a number of bytes)
    "maxManifestBytes": ("manifest_bytes", True), "maxLayers": ("layers", False),
    "maxImageBytes": ("image_bytes", True), "maxEntries": ("entries", False),
    "maxPathDepth": ("path_depth", False), "maxHeaderBytes": ("header_bytes", True),
}
_PLATFORM_KEYS = {"mungeSocketPath", "accesstype", "admins", "local", "ssh", "host", "use_external",
                  "policy_file", "arch", "os", "variant", "Compression", "BlockSize", "usergroupService",
                  "maxConcurrentPulls"}


@dataclass(frozen=True)
class Location:
    """A registry the gateway pulls from, as named in ``Locations``."""

    name: str
    url: str
    """Base URL, scheme included, no trailing slash (``https://registry-1.docker.io``)."""
    auth_method: str = "token"
    cacert: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    iaas: str | None = None
    """The cloud whose own credentials log in to it (one of ``IAAS_PROVIDERS``), for a registry reached through
    an alias or a private endpoint; None: told by the host name (imagegw.registry.iaas)."""

    @property
    def host(self) -> str:
        """``host[:port]`` of the registry, as it appears in image names."""
        return urlsplit(self.url).netloc

    @property
    def is_docker_hub(self) -> bool:
        return self.host in DOCKER_HUB_HOSTS


DOCKER_HUB_HOSTS = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
DOCKER_HUB_URL = "https://registry-1.docker.io"
IAAS_PROVIDERS = ("ecr", "gcp", "acr")
"""AWS ECR, Google (gcr.io, Artifact Registry), Azure ACR: the values of a location's ``iaas``."""


@dataclass(frozen=True)
class Compression:
    """A squashfs compressor and level, written ``"zstd:3"`` in the configuration."""

    algorithm: str
    level: int | None

    def __str__(self) -> str:
        return self.algorithm if self.level is None else f"{self.algorithm}:{self.level}"


@dataclass(frozen=True)
class SizeLimit:
    """A cap on the bytes a directory holds: fixed, or a percentage of the filesystem it is on.

    A percentage is turned into bytes when the cap is applied (``of``), so it follows the disk
    the directory is actually on, even after the directory moves to a bigger one.
    """

    bytes: int | None = None
    percent: float | None = None
    """Of the filesystem's size, when ``bytes`` is None."""

    def of(self, filesystem_size: int) -> int:
        """The cap in bytes, for a directory on a filesystem of ``filesystem_size`` bytes."""
        if self.bytes is not None:
            return self.bytes
        return int(filesystem_size * (self.percent or 0) / 100)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.bytes is None else f"{self.bytes} bytes"


@dataclass(frozen=True)
class Limits:
    """Bounds on what an image may make the gateway read and hold (``Limits``): registries and layers are
    untrusted input, and each bound stops one way of exhausting memory, disk or time."""

    manifest_bytes: int = 4 << 20
    """A manifest, index or image config (``maxManifestBytes``). Distribution, the registry Docker ships,
    refuses manifests over 4 MiB, so no stored manifest is larger; a config that large would need tens
    of thousands of history entries. Each document is held whole in memory."""
    layers: int = 128
    """Layers of one image (``maxLayers``). Docker cannot build or run an image of more than 127 (overlay2's
    "max depth exceeded"), so 128 passes every image a Docker host runs."""
    image_bytes: int | None = None
    """All layers' tars together, uncompressed (``maxImageBytes``), counted as they stream from the registry,
    so a compression bomb stops at the limit. None: what the platform's image directory has free when the
    pull starts (an image larger than that could not be published if it did not compress)."""
    entries: int = 1_000_000
    """Tar entries of all layers together, whiteouts and replaced files included (``maxEntries``). A large
    real image holds a few hundred thousand; each costs the in-memory model a few hundred bytes."""
    path_depth: int = 256
    """Names in one path of the image (``a/b/c`` has three), symbolic links followed (``maxPathDepth``).
    Deep package trees (node_modules) stay under 100; the bound stops paths built thousands deep."""
    header_bytes: int = 1 << 20
    """One tar entry's header (``maxHeaderBytes``): a GNU long name or link, or a PAX record set, which is
    read whole into memory. Real ones (long paths, xattrs, SELinux labels) are a few KiB at most."""


def _size_in_bytes(value: Any) -> int | None:
    """A whole number, or a string such as ``"500M"`` or ``"1.5T"`` (K, M, G, T: powers of 1024), in bytes;
    None for anything else (a percentage included)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or match.group(2) == "%":
        return None
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def limit_exceeded(what: str, key: str, limit: int) -> LimitExceeded:
    """The refusal of ``what`` (which says what went past it) by the limit ``Limits.<key>``, now ``limit``."""
    return LimitExceeded(f"{what} (the limit, Limits.{key}, is {limit}; raise it in the gateway's configuration "
                         "to accept this image)")


@dataclass(frozen=True)
class Platform:
    """A cluster (Shifter's *system*) whose image directory the gateway fills."""

    name: str
    image_dir: Path
    """Where the images are published: on this host, or on the remote hosts when ``remote`` is set."""
    arch: str = "amd64"
    os: str = "linux"
    variant: str | None = None
    admins: tuple[str, ...] = ()
    munge_socket: str | None = None
    compression: Compression = Compression("gzip", 1)
    block_size: int = DEFAULT_BLOCK_SIZE
    remote: RemoteAccess | None = None
    """How to reach the image directory over SSH (``accesstype: remote``); None: it is local."""
    max_concurrent_pulls: int = DEFAULT_MAX_CONCURRENT_PULLS
    """Pulls of this platform running at once, across all its workers (Prefect enforces it)."""

    @property
    def image_location(self) -> str:
        """The image directory as an operator would write it: ``/images``, or ``login1:/images``."""
        return f"{self.remote.hosts[0]}:{self.image_dir}" if self.remote else str(self.image_dir)


@dataclass(frozen=True)
class Settings:
    """The whole validated configuration."""

    source: Path
    platforms: dict[str, Platform]
    locations: dict[str, Location]
    default_location: str
    pull_update_timeout: int
    expiration_timeout: int
    """Seconds an image lives after its last pull or lookup."""
    mongodb_uri: str | None
    mongodb_database: str
    state_dir: Path
    cache_dir: Path
    expand_dir: Path
    metrics: bool = False
    """Record every lookup for ``/api/metrics`` (Shifter's ``Metrics``)."""
    import_users: frozenset[str] = frozenset()
    """Users who may import squashfs files (``ImportUsers``); see ``import_all_users``."""
    import_all_users: bool = False
    expire_schedule: str = DEFAULT_EXPIRE_SCHEDULE
    """Cron schedule of every platform's expire flow (``ExpireSchedule``)."""
    refresh_schedule: str = DEFAULT_REFRESH_SCHEDULE
    """Cron schedule of every platform's refresh flow (``RefreshSchedule``)."""
    notify_secret: str | None = field(default=None, repr=False)
    """The shared secret registries send with push notifications (``NotifySecret``); None: none accepted."""
    cache_size_limit: SizeLimit = SizeLimit(percent=DEFAULT_CACHE_SIZE_PERCENT)
    """What the layer cache may hold before the expire flow evicts its least recently used layers
    (``CacheSizeLimit``)."""

    seal_key_file: Path | None = None
    """The key sealing registry logins in MongoDB (``SealKeyFile``; default: ``<state>/seal.key``)."""
    allowed_registries: tuple[str, ...] = ()
    """Host patterns of the registries images may come from (``AllowedRegistries``, see imagegw.hostglob);
    ``("*",)`` allows any. Default: the configured Locations' hosts and Docker Hub's."""
    limits: Limits = Limits()
    """Bounds on an image's documents, layers, entries and sizes (``Limits``)."""
    api_workers: int = DEFAULT_API_WORKERS
    """Processes answering the REST API (``ApiWorkers``)."""
    registry_timeout: float = DEFAULT_REGISTRY_TIMEOUT
    """Seconds a registry may stay silent on a request before it fails as unreachable (``RegistryTimeout``)."""
    stale_pull_timeout: int = DEFAULT_STALE_PULL_TIMEOUT
    """Seconds without a heartbeat after which a running pull counts as dead and may be started again
    (``StalePullTimeout``)."""

    @property
    def seal_key_path(self) -> Path:
        return self.seal_key_file or self.state_dir / "seal.key"

    def registry_allowed(self, host: str) -> bool:
        """Whether images may be pulled from registry ``host``."""
        return self.allowed_registries == ("*",) or any(host_matches(pattern, host)
                                                         for pattern in self.allowed_registries)

    def may_import(self, user: str | None) -> bool:
        return self.import_all_users or (user is not None and user in self.import_users)

    def platform(self, name: str) -> Platform:
        """The named platform, or an error listing the ones that exist."""
        try:
            return self.platforms[name]
        except KeyError:
            known = ", ".join(sorted(self.platforms)) or "none"
            raise UnknownPlatform(
                # Not the file's path: the API answers this to callers it has not authenticated yet.
                f"platform {name!r} is not defined under Platforms (defined: {known})"
            ) from None


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read the configuration from ``path``, else ``$IMAGEGW_CONFIG``."""
    if path is None:
        path = os.environ.get(CONFIG_ENV)
        if not path:
            raise ConfigError(f"no configuration file: pass --config FILE or set {CONFIG_ENV}")
    source = Path(path).expanduser().resolve()
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {source}: {exc.strerror}") from None
    body = "\n".join("" if line.lstrip().startswith("//") else line for line in text.splitlines())
    try:
        raw = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must hold a JSON object")
    return _Reader(source).settings(raw)


class _Reader:
    """Validation of one file's content; every message names the file."""

    def __init__(self, source: Path) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{key} in {self.source}: {problem}")

    def settings(self, raw: dict[str, Any]) -> Settings:
        self._reject_unknown(raw, _TOP_LEVEL_KEYS, "")
        state_dir = Path(os.environ.get(STATE_DIR_ENV) or raw.get("StateDirectory") or "~/.imagegw").expanduser()
        compression = self._compression(raw.get("Compression", DEFAULT_COMPRESSION), "Compression")
        block_size = self._block_size(raw.get("BlockSize", DEFAULT_BLOCK_SIZE), "BlockSize")
        locations = self._locations(raw.get("Locations", {}))
        default_location = raw.get("DefaultImageLocation", "index.docker.io")
        if not isinstance(default_location, str) or not default_location:
            raise self.fail("DefaultImageLocation", "must be a location name")
        if default_location not in locations:
            locations[default_location] = self._location(default_location, {}, "DefaultImageLocation")
        image_format = raw.get("DefaultImageFormat", "squashfs")
        if image_format != "squashfs":
            raise self.fail("DefaultImageFormat", f"{image_format!r} is not supported (only 'squashfs')")
        return Settings(
            source=self.source,
            platforms=self._platforms(raw.get("Platforms"), compression, block_size),
            locations=locations,
            default_location=default_location,
            pull_update_timeout=self._seconds(raw.get("PullUpdateTimeout", 300), "PullUpdateTimeout"),
            expiration_timeout=self._duration(raw.get("ImageExpirationTimeout", "90:00:00:00")),
            mongodb_uri=os.environ.get(MONGODB_URI_ENV) or raw.get("MongoDBURI") or None,
            mongodb_database=self._string(raw.get("MongoDB", "Shifter"), "MongoDB"),
            state_dir=state_dir,
            cache_dir=self._directory(raw.get("CacheDirectory"), "CacheDirectory", state_dir / "cache"),
            expand_dir=self._directory(raw.get("ExpandDirectory"), "ExpandDirectory", state_dir / "expand"),
            metrics=self._flag(raw.get("Metrics", False), "Metrics"),
            import_users=self._import_users(raw.get("ImportUsers", "none")),
            import_all_users=raw.get("ImportUsers") == "all",
            expire_schedule=self._cron(raw.get("ExpireSchedule", DEFAULT_EXPIRE_SCHEDULE), "ExpireSchedule"),
            refresh_schedule=self._cron(raw.get("RefreshSchedule", DEFAULT_REFRESH_SCHEDULE), "RefreshSchedule"),
            notify_secret=self._secret(raw.get("NotifySecret"), "NotifySecret"),
            allowed_registries=self._allowed_registries(raw.get("AllowedRegistries"), locations),
            seal_key_file=self._path(raw.get("SealKeyFile"), "SealKeyFile"),
            cache_size_limit=self._size_limit(raw.get("CacheSizeLimit", f"{DEFAULT_CACHE_SIZE_PERCENT}%"),
                                              "CacheSizeLimit"),
            limits=self._limits(raw.get("Limits", {})),
            api_workers=self._api_workers(raw.get("ApiWorkers", DEFAULT_API_WORKERS)),
            registry_timeout=self._timeout(raw.get("RegistryTimeout", DEFAULT_REGISTRY_TIMEOUT), "RegistryTimeout"),
            stale_pull_timeout=self._stale_pull_timeout(raw.get("StalePullTimeout", DEFAULT_STALE_PULL_TIMEOUT)),
        )

    def _reject_unknown(self, raw: dict[str, Any], known: set[str], prefix: str) -> None:
        for key in raw:
            if key not in known:
                raise self.fail(prefix + key, f"unknown key (known: {', '.join(sorted(known))})")

    def _string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"must be a non-empty string, not {value!r}")
        return value

    def _api_workers(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_API_WORKERS:
            raise self.fail("ApiWorkers", f"must be a number of processes from 1 to {MAX_API_WORKERS}, not {value!r}")
        return value

    def _flag(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, not {value!r}")
        return value

    def _import_users(self, value: Any) -> frozenset[str]:
        if value in ("all", "none"):
            return frozenset()
        if not isinstance(value, list) or not all(isinstance(user, str) for user in value):
            raise self.fail("ImportUsers", f"must be 'all', 'none' or a list of user names, not {value!r}")
        return frozenset(value)

    def _allowed_registries(self, value: Any, locations: dict[str, Location]) -> tuple[str, ...]:
        if value is None:
            return tuple(sorted({location.host for location in locations.values()} | DOCKER_HUB_HOSTS))
        key = "AllowedRegistries"
        if not isinstance(value, list) or not value or not all(isinstance(item, str) and item for item in value):
            raise self.fail(key, f"must be a non-empty list of registry host patterns (e.g. [\"*.example.com\", "
                                 f"\"registry:5000\"], or [\"*\"] for any), not {value!r}")
        if "*" in value and len(value) > 1:
            raise self.fail(key, "\"*\" allows every registry: list it alone")
        for pattern in value:
            if "/" in pattern or "://" in pattern:
                raise self.fail(key, f"{pattern!r} is not a host pattern: give the registry's host[:port] only")
        return tuple(value)

    def _path(self, value: Any, key: str) -> Path | None:
        if value is None:
            return None
        path = Path(self._string(value, key)).expanduser()
        if not path.is_absolute():
            raise self.fail(key, f"must be an absolute path, not {value!r}")
        return path

    def _secret(self, value: Any, key: str) -> str | None:
        if value is None:
            return None
        secret = self._string(value, key)
        if len(secret) < MIN_SECRET_LENGTH:
            raise self.fail(key, f"must be at least {MIN_SECRET_LENGTH} characters, so it cannot be guessed")
        return secret

    def _cron(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or len(value.split()) != 5:
            raise self.fail(key, f"must be a cron schedule of five fields (e.g. '0 * * * *'), not {value!r}")
        return value

    def _size_limit(self, value: Any, key: str) -> SizeLimit:
        """Bytes as a number, or a string: ``"500M"``, ``"1.5T"`` (K, M, G, T: powers of 1024), ``"25%"``."""
        usage = ("must be a whole number of bytes, a size like '500M', '50G' or '1.5T', "
                 "or a percentage of the disk ('25%')")
        match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
        if match is not None and match.group(2) == "%":
            percent = float(match.group(1))
            if not 0 < percent <= 100:
                raise self.fail(key, f"{value!r}: a percentage must be more than 0 and at most 100")
            return SizeLimit(percent=percent)
        size = _size_in_bytes(value)
        if size is None:
            raise self.fail(key, f"{usage}, not {value!r}")
        if size < 1:
            raise self.fail(key, f"{usage}, more than 0, not {value!r}")
        return SizeLimit(bytes=size)

    def _limits(self, raw: Any) -> Limits:
        if not isinstance(raw, dict):
            raise self.fail("Limits", "must be an object of limit names to values")
        self._reject_unknown(raw, set(_LIMIT_KEYS), "Limits.")
        values: dict[str, Any] = {}
        for key, (field_name, is_bytes) in _LIMIT_KEYS.items():
            if key not in raw or (raw[key] is None and field_name == "image_bytes"):
                continue  # the default; maxImageBytes null is the default spelled out
            read = self._bytes if is_bytes else self._count
            values[field_name] = read(raw[key], f"Limits.{key}")
        return Limits(**values)

    def _bytes(self, value: Any, key: str) -> int:
        """A number of bytes: a whole number, or a size like ``"4M"`` or ``"50G"`` (powers of 1024)."""
        size = _size_in_bytes(value)
        if size is None or size < 1:
            raise self.fail(key, f"must be a number of bytes from 1 up, or a size like '4M' or '50G', not {value!r}")
        return size

    def _count(self, value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.fail(key, f"must be a whole number from 1 up, not {value!r}")
        return value

    def _seconds(self, value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(key, f"must be a whole number of seconds, not {value!r}")
        return value

    def _stale_pull_timeout(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < BEATS_PER_STALE_PULL_TIMEOUT:
            beats = BEATS_PER_STALE_PULL_TIMEOUT
            raise self.fail("StalePullTimeout", f"must be a whole number of seconds from {beats} up (a running pull "
                                                f"beats {beats} times within it, at most once a second), not {value!r}")
        return value

    def _timeout(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
            raise self.fail(key, f"must be a number of seconds above 0 (e.g. 60 or 2.5), not {value!r}")
        return float(value)

    def _duration(self, value: Any) -> int:
        key = "ImageExpirationTimeout"
        if not isinstance(value, str) or not re.fullmatch(r"\d+:\d+:\d+:\d+", value):
            raise self.fail(key, f"must be 'D:H:M:S' (e.g. '90:00:00:00'), not {value!r}")
        days, hours, minutes, seconds = (int(part) for part in value.split(":"))
        if hours > 23 or minutes > 59 or seconds > 59:
            raise self.fail(key, f"{value!r} has hours over 23 or minutes/seconds over 59")
        return ((days * 24 + hours) * 60 + minutes) * 60 + seconds

    def _directory(self, value: Any, key: str, default: Path) -> Path:
        if value is None:
            return default
        return Path(self._string(value, key)).expanduser()

    def _compression(self, value: Any, key: str) -> Compression:
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string like 'zstd:3', not {value!r}")
        algorithm, _, level_text = value.partition(":")
        if algorithm not in COMPRESSORS:
            raise self.fail(key, f"unknown compressor {algorithm!r} (use one of {', '.join(COMPRESSORS)})")
        if not level_text:
            return Compression(algorithm, None)
        levels = COMPRESSORS[algorithm]
        if not level_text.isdigit() or int(level_text) not in levels or algorithm == "lz4":
            allowed = "no level" if algorithm == "lz4" else f"a level from {levels.start} to {levels.stop - 1}"
            raise self.fail(key, f"{value!r}: {algorithm} takes {allowed}")
        return Compression(algorithm, int(level_text))

    def _block_size(self, value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 4096 or value > 1048576 \
                or value & (value - 1):
            raise self.fail(key, f"must be a power of two from 4096 to 1048576, not {value!r}")
        return value

    def _locations(self, raw: Any) -> dict[str, Location]:
        if not isinstance(raw, dict):
            raise self.fail("Locations", "must be an object of location name to settings")
        return {name: self._location(name, spec, f"Locations.{name}") for name, spec in raw.items()}

    def _location(self, name: str, spec: Any, key: str) -> Location:
        if not isinstance(spec, dict):
            raise self.fail(key, "must be an object")
        self._reject_unknown(spec, _LOCATION_KEYS, key + ".")
        if spec.get("remotetype", "dockerv2") != "dockerv2":
            raise self.fail(key + ".remotetype", f"{spec['remotetype']!r} is not supported (only 'dockerv2')")
        url = spec.get("url") or f"{'http' if spec.get('insecure') else 'https'}://{name}"
        if name in DOCKER_HUB_HOSTS and "url" not in spec:
            url = DOCKER_HUB_URL
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
                or " " in url:
            raise self.fail(key + ".url", f"{url!r} is not a usable registry URL (want https://host[:port])")
        try:
            parts.port
        except ValueError:
            raise self.fail(key + ".url", f"{url!r} has a bad port") from None
        auth_method = spec.get("authMethod", "token")
        if auth_method not in ("token", "basic"):
            raise self.fail(key + ".authMethod", f"{auth_method!r} must be 'token' or 'basic'")
        cacert = spec.get("sslcacert")
        if cacert is not None and not Path(cacert).is_file():
            raise self.fail(key + ".sslcacert", f"{cacert!r} is not a readable file")
        iaas = spec.get("iaas")
        if iaas is not None and iaas not in IAAS_PROVIDERS:
            raise self.fail(key + ".iaas", f"{iaas!r} must be one of {', '.join(map(repr, IAAS_PROVIDERS))}")
        # "insecure" means plain HTTP, whatever scheme the url was written with.
        scheme = "http" if spec.get("insecure") else parts.scheme
        return Location(name=name, url=f"{scheme}://{parts.netloc}",
                        auth_method=auth_method, cacert=cacert, iaas=iaas,
                        username=spec.get("username"), password=self._location_password(spec, key))

    def _location_password(self, spec: dict[str, Any], key: str) -> str | None:
        """A location's password: in the file itself, or (so it need not be) in a file or a variable."""
        given = [name for name in ("password", "passwordFile", "passwordEnv") if name in spec]
        if len(given) > 1:
            raise self.fail(f"{key}.{given[1]}", f"give one of password, passwordFile and passwordEnv, not "
                                                f"{' and '.join(given)}")
        if given and not spec.get("username"):
            raise self.fail(f"{key}.username", f"{given[0]} needs a username")
        if "passwordFile" in spec:
            path = Path(self._string(spec["passwordFile"], f"{key}.passwordFile")).expanduser()
            try:
                return path.read_text().rstrip("\n")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not text"
                raise self.fail(f"{key}.passwordFile", f"cannot read {str(path)!r}: {reason}") from None
        if "passwordEnv" in spec:
            variable = self._string(spec["passwordEnv"], f"{key}.passwordEnv")
            if not os.environ.get(variable):
                raise self.fail(f"{key}.passwordEnv", f"the environment variable {variable} is not set")
            return os.environ[variable]
        password = spec.get("password")
        return None if password is None else self._string(password, f"{key}.password")

    def _platforms(self, raw: Any, compression: Compression, block_size: int) -> dict[str, Platform]:
        if not isinstance(raw, dict) or not raw:
            raise self.fail("Platforms", "must define at least one platform")
        return {name: self._platform(name, spec, compression, block_size) for name, spec in raw.items()}

    def _platform(self, name: str, spec: Any, compression: Compression, block_size: int) -> Platform:
        key = f"Platforms.{name}"
        if not isinstance(spec, dict):
            raise self.fail(key, "must be an object")
        self._reject_unknown(spec, _PLATFORM_KEYS, key + ".")
        image_dir, remote = self._image_dir(spec, key)
        admins = spec.get("admins", [])
        if not isinstance(admins, list) or not all(isinstance(a, str) for a in admins):
            raise self.fail(key + ".admins", "must be a list of user names")
        return Platform(
            name=name,
            image_dir=image_dir,
            remote=remote,
            max_concurrent_pulls=self._count(spec.get("maxConcurrentPulls", DEFAULT_MAX_CONCURRENT_PULLS),
                                             key + ".maxConcurrentPulls"),
            arch=self._string(spec.get("arch", "amd64"), key + ".arch"),
            os=self._string(spec.get("os", "linux"), key + ".os"),
            variant=spec.get("variant"),
            admins=tuple(admins),
            munge_socket=spec.get("mungeSocketPath"),
            compression=self._compression(spec["Compression"], key + ".Compression")
            if "Compression" in spec else compression,
            block_size=self._block_size(spec["BlockSize"], key + ".BlockSize") if "BlockSize" in spec else block_size,
        )

    def _image_dir(self, spec: dict[str, Any], key: str) -> tuple[Path, RemoteAccess | None]:
        """Where the platform's images go: ``local.imageDir``, or ``ssh.imageDir`` on its ``host`` list."""
        access = spec.get("accesstype", "local")
        if access == "remote":
            remote, image_dir = read_remote_access(spec, key, self.fail)
            return Path(image_dir), remote
        if access != "local":
            raise self.fail(key + ".accesstype", f"{access!r} must be 'local' or 'remote'")
        local = spec.get("local")
        if not isinstance(local, dict) or not local.get("imageDir"):
            raise self.fail(key + ".local.imageDir", "is missing: the directory the images are published to")
        return Path(self._string(local["imageDir"], key + ".local.imageDir")).expanduser(), None
