"""One pull, as the pipeline's stages see it: what to pull, for which platform, filed where."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from imagegw.config import Platform, Settings
from imagegw.registry.credentials import RegistryLogin
from imagegw.errors import BadImageReference
from imagegw.store.records import PUBLIC, Access, ImageFacts, PullKey
from imagegw.publish.shifter_meta import render_meta
from imagegw.registry.reference import ImageRef, normalize_tag, parse_image_reference
from imagegw.registry.client import PlatformSpec, ResolvedImage

PULLABLE_TYPES = ("docker",)


@dataclass(frozen=True)
class PullJob:
    """Everything a stage needs to know about the pull it works on."""

    settings: Settings
    platform: Platform
    key: PullKey
    ref: ImageRef
    """The image, its location carrying the requester's registry login when one was given."""
    access: Access = PUBLIC
    """Who the requester asked to be able to read the image."""

    @property
    def wanted_platform(self) -> PlatformSpec:
        return PlatformSpec(os=self.platform.os, architecture=self.platform.arch, variant=self.platform.variant)


def pull_key(platform: str, image: str, itype: str = "docker") -> PullKey:
    """The record a pull of ``image`` is filed under (``:latest`` added when untagged)."""
    if itype not in PULLABLE_TYPES:
        raise BadImageReference(f"image type {itype!r} cannot be pulled (only {', '.join(PULLABLE_TYPES)})")
    return PullKey(system=platform, itype=itype, tag=normalize_tag(image))


def plan_pull(settings: Settings, key: PullKey, login: RegistryLogin | None = None,
              access: Access = PUBLIC) -> PullJob:
    """Resolve the platform and the image name against the configuration.

    A requester's registry login replaces the configured one for the image's location.
    """
    platform = settings.platform(key.system)
    ref = parse_image_reference(key.tag, settings.locations, settings.default_location)
    if login is not None:
        ref = replace(ref, location=replace(ref.location, username=login.username, password=login.password))
    return PullJob(settings=settings, platform=platform, key=key, ref=ref, access=access)


def image_facts(image: ResolvedImage, size: int) -> ImageFacts:
    """What the index records about a pulled image."""
    config = _runtime_config(image)
    return ImageFacts(
        id=image.image_id,
        manifest_digest=image.manifest_digest,
        registry=image.ref.location.host,
        repository=image.ref.repository,
        arch=image.config.get("architecture", "unknown"),
        os=image.config.get("os", "unknown"),
        size=size,
        layers=[layer.digest for layer in image.layers],
        env=list(config.get("Env") or []),
        entry=config.get("Entrypoint") or None,
        cmd=config.get("Cmd") or None,
        workdir=config.get("WorkingDir") or None,
        labels=dict(config.get("Labels") or {}),
    )


def image_meta(image: ResolvedImage, access: Access) -> str:
    """The ``.meta`` text the runtime reads beside the image (with the ACL of a private image)."""
    config = _runtime_config(image)
    return render_meta(env=config.get("Env") or [], entry=config.get("Entrypoint"), cmd=config.get("Cmd"),
                       workdir=config.get("WorkingDir"), user_acl=access.user_acl, group_acl=access.group_acl)


def _runtime_config(image: ResolvedImage) -> dict[str, Any]:
    return image.config.get("config") or {}
