"""One pull, as the pipeline's stages see it: what to pull, for which platform, filed where."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imagegw.config import Platform, Settings
from imagegw.errors import BadImageReference
from imagegw.index import ImageFacts, PullKey
from imagegw.meta import render_meta
from imagegw.reference import ImageRef, normalize_tag, parse_image_reference
from imagegw.registry import PlatformSpec, ResolvedImage

PULLABLE_TYPES = ("docker",)


@dataclass(frozen=True)
class PullJob:
    """Everything a stage needs to know about the pull it works on."""

    settings: Settings
    platform: Platform
    key: PullKey
    ref: ImageRef

    @property
    def wanted_platform(self) -> PlatformSpec:
        return PlatformSpec(os=self.platform.os, architecture=self.platform.arch, variant=self.platform.variant)


def pull_key(platform: str, image: str, itype: str = "docker") -> PullKey:
    """The record a pull of ``image`` is filed under (``:latest`` added when untagged)."""
    if itype not in PULLABLE_TYPES:
        raise BadImageReference(f"image type {itype!r} cannot be pulled (only {', '.join(PULLABLE_TYPES)})")
    return PullKey(system=platform, itype=itype, tag=normalize_tag(image))


def plan_pull(settings: Settings, key: PullKey) -> PullJob:
    """Resolve the platform and the image name against the configuration."""
    platform = settings.platform(key.system)
    ref = parse_image_reference(key.tag, settings.locations, settings.default_location)
    return PullJob(settings=settings, platform=platform, key=key, ref=ref)


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


def image_meta(image: ResolvedImage) -> str:
    """The ``.meta`` text the runtime reads beside the image."""
    config = _runtime_config(image)
    return render_meta(env=config.get("Env") or [], entry=config.get("Entrypoint"), cmd=config.get("Cmd"),
                       workdir=config.get("WorkingDir"))


def _runtime_config(image: ResolvedImage) -> dict[str, Any]:
    return image.config.get("config") or {}
