"""The watch list's entries: images operators want held READY on a platform, by tag or by tag pattern.

An entry is an image name as users write it, whose tag may be a shell-style pattern
(``myreg:5000/team/app:v1.*``): the refresh flow expands a pattern through the registry's tag
list, and a registry's push notification starts the pull of a pushed tag an entry matches.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from imagegw.config import Settings
from imagegw.errors import BadImageReference
from imagegw.registry import ImageRef, image_reference, normalize_tag

_PATTERN_CHARACTERS = frozenset("*?[")
_TAG_PATTERN = re.compile(r"[A-Za-z0-9_.\-*?\[\]!]{1,128}")


@dataclass(frozen=True)
class WatchedImage:
    """One entry: a repository and a tag, or a pattern of tags, in it."""

    image: str
    """The entry as stored: the user's name with ``:latest`` added when it had no tag."""
    repository: ImageRef
    """Where the tags are; its ``tag`` is the entry's tag or pattern."""

    @property
    def is_pattern(self) -> bool:
        return bool(_PATTERN_CHARACTERS & set(self.tag))

    @property
    def tag(self) -> str:
        return self.repository.tag or "latest"

    def image_for(self, tag: str) -> str:
        """The image name (as records file it) of one of the repository's tags."""
        return f"{self.image.rsplit(':', 1)[0]}:{tag}"

    def matches(self, registry_host: str, repository: str, tag: str) -> bool:
        """Whether a tag pushed to ``registry_host``/``repository`` is one this entry holds ready."""
        return (registry_host == self.repository.location.host and repository == self.repository.repository
                and self.matches_tag(tag))

    def matches_tag(self, tag: str) -> bool:
        """Whether ``tag``, of this entry's repository, is one it holds ready."""
        return fnmatchcase(tag, self.tag)


def parse_watched(text: str, settings: Settings) -> WatchedImage:
    """An entry from an operator's ``imagegw watch add`` argument, checked like an image name."""
    image = normalize_tag(text)
    if "@" in image:
        raise BadImageReference(f"{text!r}: a watch list entry names a tag (or a tag pattern), not a digest, "
                                "since a digest never moves")
    name, tag = image.rsplit(":", 1)
    if not _TAG_PATTERN.fullmatch(tag):
        raise BadImageReference(f"{text!r}: the tag pattern {tag!r} may hold letters, digits, '_', '.', '-' and "
                                "the wildcards '*', '?', '[...]' (at most 128 characters)")
    # The name is checked with a plain tag, whose rules the pattern's wildcards would break.
    ref = image_reference(f"{name}:latest", settings)
    return WatchedImage(image=image, repository=ImageRef(ref.location, ref.repository, tag=tag))
