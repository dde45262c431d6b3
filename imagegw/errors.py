"""The gateway's error vocabulary.

Every failure a user or operator can meet is one of these classes. The message
is written for the person reading it (it becomes a pull record's
``status_message`` and the CLI's output), and names what was wrong: the image,
the layer, the key, the file. The REST API maps these classes to HTTP codes in
one table; nothing else decides an error's meaning.
"""


class ImagegwError(Exception):
    """Something the gateway could not do; the message says what and why."""


class ConfigError(ImagegwError):
    """The configuration file is missing, unreadable, or has a bad key."""


class UnknownPlatform(ConfigError):
    """A platform (system) that the configuration does not define."""


class BadImageReference(ImagegwError):
    """An image name that cannot be parsed (e.g. ``ubuntu:``, ``UPPER/case``)."""


class RegistryNotAllowed(BadImageReference):
    """An image on a registry that ``AllowedRegistries`` does not list: refused before any request."""


class RegistryError(ImagegwError):
    """The registry refused or failed a request."""


class RegistryUnreachable(RegistryError):
    """The registry could not be reached (connection refused, timeout, 5xx)."""


class RegistryUnauthorized(RegistryError):
    """The registry wants credentials we do not have, or rejected ours."""


class ManifestUnknown(RegistryError):
    """The repository, tag or digest does not exist in the registry."""


class UnsupportedManifest(RegistryError):
    """A manifest of a kind the gateway cannot pull (e.g. schema 1)."""


class NoMatchingPlatform(RegistryError):
    """A multi-arch index that has no image for the platform's os/arch."""


class DigestMismatch(RegistryError):
    """Downloaded bytes whose sha256 differs from the digest that named them."""


class LayerError(ImagegwError):
    """A layer that cannot be applied (corrupt tar, invalid whiteout, ...)."""


class UnsafeLayerEntry(LayerError):
    """A layer entry that would break the image root or the host if obeyed."""


class LimitExceeded(ImagegwError):
    """An image past one of the configured bounds on untrusted input (``Limits``): too many layers or
    entries, too large a document, header or whole, too deep a path. Not retried: the image stays the
    same; the message names the limit, its value and the key that raises it."""


class SquashError(ImagegwError):
    """Building or verifying the squashfs failed."""


class StorageError(ImagegwError):
    """A file the gateway writes could not be written (``<path>: No space left on device``).

    Not retried: a full or failing disk does not heal in the seconds between a stage's
    retries, and retrying would repeat the downloads and the build before failing the same
    way. The message names the path, so an operator knows which filesystem to look at.
    """


class TransferError(ImagegwError):
    """Publishing to a platform's image directory on another host failed: no host answered, or the
    connection broke. Retried: hosts come back, and a retry connects afresh."""


class RemoteAccessRefused(ImagegwError):
    """A remote platform's hosts refused the gateway for a reason a retry cannot fix: an unknown or
    changed host key, or a login key they do not accept."""


class ServiceUnavailable(ImagegwError):
    """A service the gateway needs (munged, MongoDB, Prefect) is down."""


class IndexUnavailable(ServiceUnavailable):
    """The MongoDB image index cannot be reached."""


class RecordConflict(ImagegwError):
    """The image index refused a record that collides with one it holds (a unique key)."""


class PullTakenOver(ImagegwError):
    """A pull's run whose record another run took over, after the record went ``StalePullTimeout`` without
    this run's heartbeat (its host or database too slow or cut off that long): it stops and writes nothing
    more, neither stage nor failure nor image, since the record and the image are the new run's. Not retried."""


class ImageNotFound(ImagegwError):
    """No image record matches the request (or the caller may not see it)."""


class AuthenticationFailed(ImagegwError):
    """A bad, expired, replayed or missing credential."""


class Forbidden(ImagegwError):
    """The caller is authenticated but may not do this (e.g. an admin-only call)."""


class BadRequest(ImagegwError):
    """A request body or parameter the gateway cannot use."""


TRANSIENT_ERRORS = (RegistryUnreachable, TransferError, IndexUnavailable)
"""Errors worth retrying: the same request may succeed a moment later."""
