"""What one pull needs: the image, the platform it is for, the record it is filed under, who may read it.

A :class:`PullPlan` carries only these: not the configuration, whose other locations'
passwords no stage needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from imagegw.access import PUBLIC, Access
from imagegw.config import Limits, Platform, Settings
from imagegw.errors import BadImageReference, RegistryUnauthorized
from imagegw.publish import Publisher
from imagegw.registry import Credential, ImageBytesLimit, ImageRef, PlatformSpec, image_reference, normalize_tag
from imagegw.registry.keychain import HandedCredential, Keychain
from imagegw.store import PullKey

PULLABLE_TYPES = ("docker",)


@dataclass(frozen=True)
class PullPlan:
    """One pull, as the pipeline's stages see it."""

    platform: Platform
    key: PullKey
    ref: ImageRef
    access: Access = PUBLIC
    """Who the requester asked to be able to read the image."""
    credential: Credential | None = field(default=None, repr=False)
    """What to authenticate to the registry with (see imagegw.registry.keychain); None: anonymous."""

    @property
    def wanted_platform(self) -> PlatformSpec:
        """The os/architecture whose image to pick from a multi-arch index."""
        return PlatformSpec(os=self.platform.os, architecture=self.platform.arch, variant=self.platform.variant)


def pull_key(platform: str, image: str, itype: str = "docker") -> PullKey:
    """The record a pull of ``image`` is filed under (``:latest`` added when untagged)."""
    if itype not in PULLABLE_TYPES:
        raise BadImageReference(f"image type {itype!r} cannot be pulled (only {', '.join(PULLABLE_TYPES)})")
    return PullKey(system=platform, itype=itype, tag=normalize_tag(image))


def image_bytes_limit(limits: Limits, publisher: Publisher) -> ImageBytesLimit | None:
    """What an image's layers may hold uncompressed: ``Limits.maxImageBytes``, else what the image directory
    has free now (None: it cannot tell, and the pull is bounded by its disks filling only)."""
    if limits.image_bytes is not None:
        return ImageBytesLimit(limits.image_bytes)
    free = publisher.free_bytes()
    return None if free is None else ImageBytesLimit(free, free_in=str(publisher))


def plan_pull(settings: Settings, key: PullKey, handed: HandedCredential | None = None,
              access: Access = PUBLIC, keychain: Keychain | None = None) -> PullPlan:
    """Resolve the platform and the image name against the configuration; with a ``keychain``, the
    registry credential too (a requester's login or the CLI's flags, ``handed``, taking their place in it).
    """
    platform = settings.platform(key.system)
    if access.private and handed is None:
        # A re-run of a private pull (from the Prefect UI, say): its login was for one run only, and an
        # anonymous pull would quietly publish something else than what was asked.
        raise RegistryUnauthorized(f"{key.tag} was asked for with the requester's registry login, which serves one "
                                   "pull only: the requester must pull it again with their login")
    ref = image_reference(key.tag, settings)
    credential = keychain.credential_for(ref, handed) if keychain is not None else None
    return PullPlan(platform=platform, key=key, ref=ref, access=access, credential=credential)
