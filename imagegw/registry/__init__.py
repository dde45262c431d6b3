"""Getting images from Docker v2 / OCI registries: names, logins, manifests, and layers into the cache."""

from imagegw.registry.client import (
    LayerDescriptor,
    PlatformSpec,
    RegistryClient,
    ResolvedImage,
)
from imagegw.registry.credentials import (
    Credential,
    RegistryLogin,
    login_for,
    parse_authorized_locations,
)
from imagegw.registry.layercache import ImageBytesLimit, LayerCache, fetch_layers
from imagegw.registry.progress import DownloadProgress
from imagegw.registry.reference import ImageRef, image_reference, normalize_tag, parse_image_reference

__all__ = [
    "Credential",
    "DownloadProgress",
    "ImageBytesLimit",
    "ImageRef",
    "LayerCache",
    "LayerDescriptor",
    "PlatformSpec",
    "RegistryClient",
    "RegistryLogin",
    "ResolvedImage",
    "fetch_layers",
    "image_reference",
    "login_for",
    "normalize_tag",
    "parse_authorized_locations",
    "parse_image_reference",
]
