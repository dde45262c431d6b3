"""Image names as users write them, resolved against the configured locations.

``ubuntu`` is ``library/ubuntu:latest`` on Docker Hub (or on
``DefaultImageLocation``); ``myreg:5000/team/app:1`` names its registry; a first
component that is a ``Locations`` key names that location, as in Shifter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from imagegw.config import DOCKER_HUB_HOSTS, DOCKER_HUB_URL, Location, Settings
from imagegw.errors import BadImageReference, RegistryNotAllowed

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_NAME = 255
"""The distribution spec's limit on a repository name."""
_MAX_HOST = 253 + len(":65535")
"""A DNS name's limit, and a port: a longer first component is no registry, so the name is too long."""
_HOST = re.compile(r"(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?")


@dataclass(frozen=True)
class ImageRef:
    """A repository in a registry, and the tag or digest that picks an image in it."""

    location: Location
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest if given, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        name = f"{self.location.host}/{self.repository}"
        if self.tag:
            name += f":{self.tag}"
        if self.digest:
            name += f"@{self.digest}"
        return name


def normalize_tag(text: str) -> str:
    """The tag a record is filed under: the user's name, with ``:latest`` if it has no tag or digest."""
    text = text.strip()
    last = text.rsplit("/", 1)[-1]
    if ":" not in last and "@" not in last:
        return text + ":latest"
    return text


def image_reference(text: str, settings: Settings) -> ImageRef:
    """``text`` resolved against the configuration; refused, before any request is made, when its registry
    is not one ``AllowedRegistries`` lists."""
    ref = parse_image_reference(text, settings.locations, settings.default_location)
    if not settings.registry_allowed(ref.location.host):
        raise RegistryNotAllowed(f"registry {ref.location.host} is not allowed on this gateway "
                                 "(AllowedRegistries in its configuration)")
    return ref


def parse_image_reference(text: str, locations: dict[str, Location], default_location: str) -> ImageRef:
    """Resolve a user's image name to a registry, repository and tag or digest."""
    original = text
    text = text.strip()
    if not text:
        raise BadImageReference("empty image name")
    name, digest = _split_digest(text, original)
    name, tag = _split_tag(name, original)
    location, repository = _split_location(name, locations, default_location)
    if location.is_docker_hub and "/" not in repository:
        repository = "library/" + repository
    for component in repository.split("/"):
        if not _COMPONENT.fullmatch(component):
            raise BadImageReference(
                f"bad image name {original!r}: repository component {component!r} must be lower-case "
                "letters and digits, separated by '.', '_', '__' or '-'"
            )
    if len(repository) > _MAX_NAME:
        raise BadImageReference(
            f"bad image name {original[:80]!r}...: repository names are at most {_MAX_NAME} characters")
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef(location=location, repository=repository, tag=tag, digest=digest)


def _split_digest(text: str, original: str) -> tuple[str, str | None]:
    if "@" not in text:
        return text, None
    name, digest = text.split("@", 1)
    if not _DIGEST.fullmatch(digest):
        raise BadImageReference(f"bad image name {original!r}: digest must be sha256: and 64 hex digits")
    return name, digest


def _split_tag(name: str, original: str) -> tuple[str, str | None]:
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon <= slash:
        return name, None
    tag = name[colon + 1:]
    if not _TAG.fullmatch(tag):
        raise BadImageReference(
            f"bad image name {original!r}: tag {tag!r} must be letters, digits, '_', '.' or '-' "
            "(at most 128, not starting with '.' or '-')"
        )
    return name[:colon], tag


def _split_location(name: str, locations: dict[str, Location], default_location: str) -> tuple[Location, str]:
    first, sep, rest = name.partition("/")
    if sep and first in locations:
        return locations[first], rest
    if sep and _looks_like_host(first):
        if first in DOCKER_HUB_HOSTS:
            return _docker_hub(locations), rest
        return Location(name=first, url=f"https://{first}"), rest
    return locations[default_location], name


def _looks_like_host(component: str) -> bool:
    return ((component == "localhost" or "." in component or ":" in component) and len(component) <= _MAX_HOST
            and bool(_HOST.fullmatch(component)))


def _docker_hub(locations: dict[str, Location]) -> Location:
    for location in locations.values():
        if location.is_docker_hub:
            return location
    return Location(name="docker.io", url=DOCKER_HUB_URL)
