"""What one pull needs: the image, the platform it is for, the record it is filed under, who may read it.

A :class:`PullPlan` carries only these: not the configuration, whose other locations'
passwords no stage needs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from imagegw.access import PUBLIC, Access
from imagegw.config import Platform, Settings
from imagegw.errors import BadImageReference, RegistryUnauthorized
from imagegw.registry import ImageRef, PlatformSpec, RegistryLogin, image_reference, normalize_tag
from imagegw.store import PullKey

PULLABLE_TYPES = ("docker",)


@dataclass(frozen=True)
class PullPlan:
    """One pull, as the pipeline's stages see it."""

    platform: Platform
    key: PullKey
    ref: ImageRef
    """The image, its location carrying the requester's registry login when one was given."""
    access: Access = PUBLIC
    """Who the requester asked to be able to read the image."""

    @property
    def wanted_platform(self) -> PlatformSpec:
        """The os/architecture whose image to pick from a multi-arch index."""
        return PlatformSpec(os=self.platform.os, architecture=self.platform.arch, variant=self.platform.variant)


def pull_key(platform: str, image: str, itype: str = "docker") -> PullKey:
    """The record a pull of ``image`` is filed under (``:latest`` added when untagged)."""
    if itype not in PULLABLE_TYPES:
        raise BadImageReference(f"image type {itype!r} cannot be pulled (only {', '.join(PULLABLE_TYPES)})")
    return PullKey(system=platform, itype=itype, tag=normalize_tag(image))


def plan_pull(settings: Settings, key: PullKey, login: RegistryLogin | None = None,
              access: Access = PUBLIC) -> PullPlan:
    """Resolve the platform and the image name against the configuration.

    A requester's registry login replaces the configured one for the image's location.
    """
    platform = settings.platform(key.system)
    if access.private and login is None:
        # A re-run of a private pull (from the Prefect UI, say): its login was for one run only, and an
        # anonymous pull would quietly publish something else than what was asked.
        raise RegistryUnauthorized(f"{key.tag} was asked for with the requester's registry login, which serves one "
                                   "pull only: the requester must pull it again with their login")
    ref = image_reference(key.tag, settings)
    if login is not None:
        ref = replace(ref, location=replace(ref.location, username=login.username, password=login.password))
    return PullPlan(platform=platform, key=key, ref=ref, access=access)
