"""A Docker Registry v2 / OCI distribution client: resolve an image, stream its layers.

``resolve`` turns a tag or digest into the platform's image manifest and its
config, verifying every digest on the way; ``blob_chunks`` streams a layer's bytes.
Authentication (anonymous or Basic-credential Bearer tokens, plain Basic) is
negotiated from the registry's 401 challenges, and every failure becomes one of
the :mod:`imagegw.errors` classes with a message naming the registry and image.
Credentials and tokens never appear in messages.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urljoin, urlsplit

import requests

from imagegw.config import DEFAULT_REGISTRY_TIMEOUT, Limits, Location, limit_exceeded
from imagegw.errors import (
    DigestMismatch,
    ManifestUnknown,
    NoMatchingPlatform,
    RegistryError,
    RegistryUnauthorized,
    RegistryUnreachable,
    UnsupportedManifest,
)
from imagegw.registry.auth import Authenticator
from imagegw.registry.credentials import Credential, configured_credential
from imagegw.registry.reference import ImageRef

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_SCHEMA1 = {
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
}
_IMAGE_MANIFESTS = {OCI_MANIFEST, DOCKER_MANIFEST}
_INDEXES = {OCI_INDEX, DOCKER_MANIFEST_LIST}
_IMAGE_CONFIGS = {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))

# Digests become cache file names, so anything but sha256 hex is refused up front.
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_REDIRECTS = 5
_TAGS_PER_PAGE = 1000
_MAX_TAG_PAGES = 10_000
"""Ten million tags: past that, a registry's ``next`` links go round in circles."""
_REDIRECT_CODES = {301, 302, 303, 307, 308}
_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64"}


@dataclass(frozen=True)
class PlatformSpec:
    """The os/architecture[/variant] whose image to pick from a multi-arch index."""

    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)


@dataclass(frozen=True)
class LayerDescriptor:
    """One layer blob as the manifest lists it (compressed digest and size)."""

    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class ResolvedImage:
    """A platform-specific image: its manifest digest, config and layers."""

    ref: ImageRef
    manifest_digest: str
    """Digest of the platform-specific image manifest (not of the index)."""
    manifest_media_type: str
    config: dict[str, Any]
    layers: tuple[LayerDescriptor, ...]
    tag_digest: str
    """Digest of what the tag names: the index of a multi-arch image, else the manifest itself.
    A registry's HEAD on the tag answers with it, so a refresh can tell whether the tag moved."""

    @property
    def image_id(self) -> str:
        """The manifest digest's hex, the image's identity in records and file names."""
        return self.manifest_digest.split(":", 1)[1]

    @property
    def diff_ids(self) -> tuple[str, ...]:
        """Digests of the uncompressed layers, in layer order."""
        return tuple((self.config.get("rootfs") or {}).get("diff_ids") or ())

    @property
    def runtime_config(self) -> dict[str, Any]:
        """How the image wants to be run: ``Env``, ``Entrypoint``, ``Cmd``, ``WorkingDir``, ``Labels``."""
        config = self.config.get("config")
        return config if isinstance(config, dict) else {}


class _Manifest(NamedTuple):
    media_type: str
    digest: str
    document: dict[str, Any]


class RegistryClient:
    """Talks to one registry location; safe to share between download threads."""

    def __init__(self, location: Location, *, credential: Credential | None = None,
                 timeout: float = DEFAULT_REGISTRY_TIMEOUT,
                 user_agent: str = "imagegw", config_cache: Path | None = None, limits: Limits = Limits()) -> None:
        """``credential``: what to authenticate with (default: the location's configured username and
        password, if it has them; else anonymous). ``config_cache``: a directory keeping image configs
        by digest, so a re-pull fetches no blob. ``limits``: the bounds on documents and layer counts.
        ``timeout``: seconds the registry may stay silent, before answering or within a body (``RegistryTimeout``)."""
        self.location = location
        self._limits = limits
        self._timeout = timeout
        self._config_cache = config_cache
        self._session = requests.Session()
        self._session.headers["User-Agent"] = user_agent
        self._auth = Authenticator(location, credential or configured_credential(location), self._send)

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the pooled connections."""
        self._session.close()

    def resolve(self, ref: ImageRef, platform: PlatformSpec) -> ResolvedImage:
        """The image ``ref`` names for ``platform``: manifest, config and layers, all digest-checked."""
        manifest = self._fetch_manifest(ref, ref.reference)
        tag_digest = manifest.digest
        if manifest.media_type in _INDEXES:
            chosen = _choose_platform(manifest.document, platform, ref)
            manifest = self._fetch_manifest(ref, chosen)
            if manifest.media_type in _INDEXES:
                raise UnsupportedManifest(f"{ref}: the index entry for {platform} is itself an index")
        raw_layers = manifest.document.get("layers")
        if not isinstance(raw_layers, list):
            raise UnsupportedManifest(f"malformed manifest for {ref}: no layer list")
        if len(raw_layers) > self._limits.layers:
            raise limit_exceeded(f"{ref} has {len(raw_layers)} layers", "maxLayers", self._limits.layers)
        config_descriptor = _descriptor(manifest.document.get("config"), "config", ref)
        if config_descriptor.media_type not in _IMAGE_CONFIGS:
            raise UnsupportedManifest(
                f"{ref} is not a container image (its config is {config_descriptor.media_type!r})"
            )
        config = self._fetch_config(ref, config_descriptor)
        layers = tuple(_descriptor(entry, "layer", ref) for entry in raw_layers)
        image = ResolvedImage(ref, manifest.digest, manifest.media_type, config, layers, tag_digest)
        if len(image.diff_ids) != len(layers):
            raise UnsupportedManifest(
                f"{ref}: the image config lists {len(image.diff_ids)} diff_ids for {len(layers)} layers"
            )
        return image

    def check_credential(self) -> bool:
        """Log in to the registry's API root as ``docker login`` does: raise RegistryUnauthorized if the
        credential is refused; False when the registry asks for none (so it cannot be checked)."""
        url, subject = f"{self.location.url}/v2/", f"a login to {self.location.host}"
        with self._send(url, subject, {}) as response:
            if response.status_code == 200:
                return False
            if response.status_code != 401:
                self._check(response, subject)
            challenge = response.headers.get("WWW-Authenticate", "")
        authorization = self._auth.authorize(challenge, "", subject)
        with self._send(url, subject, {"Authorization": authorization}) as response:
            if response.status_code in (401, 403):
                raise self._auth.refused(response.status_code, subject)
            self._check(response, subject)
        return True

    def tag_digest(self, ref: ImageRef) -> str:
        """The digest of what ``ref``'s tag names now (see :attr:`ResolvedImage.tag_digest`).

        One HEAD request; a registry that sends no ``Docker-Content-Digest`` costs a GET instead.
        """
        response = self._get(self._manifest_url(ref, ref.reference), str(ref), ref.repository,
                             {"Accept": _ACCEPT}, method="HEAD")
        with response:
            if response.status_code == 404:
                raise ManifestUnknown(f"manifest unknown: {ref}")
            self._check(response, str(ref))
            claimed = response.headers.get("Docker-Content-Digest", "")
        if _DIGEST.fullmatch(claimed):
            return claimed
        return self._fetch_manifest(ref, ref.reference).digest

    def tags(self, repository: str) -> list[str]:
        """Every tag of ``repository``, following the registry's pagination (``Link: <…>; rel="next"``)."""
        subject = f"the tag list of {self.location.host}/{repository}"
        url: str | None = f"{self.location.url}/v2/{repository}/tags/list?n={_TAGS_PER_PAGE}"
        tags: list[str] = []
        for _ in range(_MAX_TAG_PAGES):
            if url is None:
                return tags
            response = self._get(url, subject, repository, {})
            if response.status_code == 404:
                message = _registry_message(response)
                response.close()
                raise ManifestUnknown(f"repository unknown: {self.location.host}/{repository} ({message})")
            self._check(response, subject)
            following = response.links.get("next", {}).get("url")
            body = _read_document(response, self._limits.manifest_bytes, subject, self._timeout)
            page = _parse_json(body, subject).get("tags") or []
            if not isinstance(page, list) or not all(isinstance(tag, str) for tag in page):
                raise RegistryError(f"registry {self.location.host} sent a malformed tag list for {repository}")
            tags.extend(page)
            url = urljoin(url, following) if following else None
        raise RegistryError(f"{subject} runs past {_MAX_TAG_PAGES} pages: the registry's pagination loops")

    @contextlib.contextmanager
    def blob_chunks(self, repository: str, digest: str, chunk_size: int) -> Iterator[Iterator[bytes]]:
        """The bytes of layer blob ``digest``, in chunks of up to ``chunk_size``, for the ``with`` block.

        The request is made on entering: a missing blob, a refusal or an unreachable registry
        raise there. A connection lost while the chunks are read raises RegistryUnreachable from
        the iteration. The connection is closed when the block ends, however it ends: read to
        the end, left early, or left by an exception.
        """
        response = self._open_blob(repository, digest)
        try:
            yield _chunks(response, f"layer {digest} of {self.location.host}/{repository}", chunk_size,
                          self._timeout)
        finally:
            response.close()

    def _open_blob(self, repository: str, digest: str) -> requests.Response:
        """A streaming response for blob ``digest``, ready for ``iter_content``; the caller closes it."""
        subject = f"{self.location.host}/{repository}@{digest}"
        response = self._get(
            f"{self.location.url}/v2/{repository}/blobs/{digest}", subject, repository,
            # Blob digests cover the stored bytes, so no transfer encoding may alter them.
            {"Accept-Encoding": "identity"},
        )
        if response.status_code == 404:
            message = _registry_message(response)
            response.close()
            raise RegistryError(f"blob {digest} is missing from {self.location.host}/{repository} ({message})")
        self._check(response, subject)
        return response

    # -- manifests and config -------------------------------------------------------------------

    def _manifest_url(self, ref: ImageRef, reference: str) -> str:
        return f"{self.location.url}/v2/{ref.repository}/manifests/{reference}"

    def _fetch_manifest(self, ref: ImageRef, reference: str) -> _Manifest:
        response = self._get(self._manifest_url(ref, reference), str(ref), ref.repository, {"Accept": _ACCEPT})
        if response.status_code == 404:
            codes = _error_codes(response)
            response.close()
            if "NAME_UNKNOWN" in codes or not self._repository_exists(ref):
                raise ManifestUnknown(f"repository unknown: {ref}")
            raise ManifestUnknown(f"manifest unknown: {ref}")
        self._check(response, str(ref))
        body = _read_document(response, self._limits.manifest_bytes, f"manifest of {ref}", self._timeout)
        digest = _sha256(body)
        if reference.startswith("sha256:") and digest != reference:
            raise DigestMismatch(f"manifest of {ref}: registry sent bytes with digest {digest}, asked for {reference}")
        claimed = response.headers.get("Docker-Content-Digest", "")
        if claimed.startswith("sha256:") and claimed != digest:
            raise DigestMismatch(f"manifest of {ref}: registry says its digest is {claimed}, the bytes have {digest}")
        document = _parse_json(body, f"manifest of {ref}")
        return _Manifest(_media_type(response, document, ref), digest, document)

    def _repository_exists(self, ref: ImageRef) -> bool:
        """False only when the registry says so: distribution answers MANIFEST_UNKNOWN for unknown repositories too."""
        try:
            response = self._get(f"{self.location.url}/v2/{ref.repository}/tags/list", str(ref), ref.repository, {})
        except RegistryError:
            return True
        with response:
            return response.status_code != 404 or "NAME_UNKNOWN" not in _error_codes(response)

    def _fetch_config(self, ref: ImageRef, descriptor: LayerDescriptor) -> dict[str, Any]:
        cached = self._cached_config(descriptor.digest)
        if cached is not None:
            return _parse_json(cached, f"image config of {ref}")
        response = self._open_blob(ref.repository, descriptor.digest)
        body = _read_document(response, self._limits.manifest_bytes, f"image config of {ref}",
                              self._timeout)
        if _sha256(body) != descriptor.digest:
            raise DigestMismatch(
                f"image config of {ref}: downloaded bytes have digest {_sha256(body)}, expected {descriptor.digest}"
            )
        config = _parse_json(body, f"image config of {ref}")
        self._keep_config(descriptor.digest, body)
        return config

    def _cached_config(self, digest: str) -> bytes | None:
        """A config kept earlier, if its bytes still have its digest."""
        if self._config_cache is None:
            return None
        try:
            body = (self._config_cache / digest.split(":", 1)[1]).read_bytes()
        except OSError:
            return None
        return body if _sha256(body) == digest else None

    def _keep_config(self, digest: str, body: bytes) -> None:
        if self._config_cache is None:
            return
        # Written aside and renamed; a cache that cannot be written only costs a later request.
        target = self._config_cache / digest.split(":", 1)[1]
        temporary = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
        try:
            self._config_cache.mkdir(parents=True, exist_ok=True)
            temporary.write_bytes(body)
            os.replace(temporary, target)
        except OSError:
            temporary.unlink(missing_ok=True)

    # -- HTTP, authentication and errors --------------------------------------------------------

    def _get(self, url: str, subject: str, repository: str, headers: dict[str, str],
             method: str = "GET") -> requests.Response:
        """GET (or HEAD) with authentication, then follow redirects by hand without it."""
        response = self._authenticated_get(url, subject, f"repository:{repository}:pull", headers, method)
        for _ in range(_MAX_REDIRECTS):
            if response.status_code not in _REDIRECT_CODES:
                return response
            target = response.headers.get("Location")
            response.close()
            if not target:
                raise RegistryError(f"registry {self.location.host} sent a redirect without a target for {subject}")
            url = urljoin(url, target)
            # Redirect targets are typically object stores with signed URLs: our credentials or
            # token mean nothing there and must not leak to them (Shifter #232).
            response = self._send(url, subject, headers, method=method)
        if response.status_code in _REDIRECT_CODES:
            response.close()
            raise RegistryError(
                f"registry {self.location.host} redirected more than {_MAX_REDIRECTS} times for {subject}"
            )
        return response

    def _authenticated_get(self, url: str, subject: str, scope: str, headers: dict[str, str],
                           method: str = "GET") -> requests.Response:
        authorization = self._auth.cached(scope)
        response = self._send(url, subject, _with_authorization(headers, authorization), method=method)
        if response.status_code == 401:
            challenge = response.headers.get("WWW-Authenticate", "")
            response.close()
            authorization = self._auth.authorize(challenge, scope, subject)
            response = self._send(url, subject, _with_authorization(headers, authorization), method=method)
        if response.status_code in (401, 403):
            response.close()
            raise self._auth.refused(response.status_code, subject)
        return response

    def _send(self, url: str, subject: str, headers: dict[str, str], *, params: dict[str, str] | None = None,
              auth: tuple[str, str] | None = None, method: str = "GET",
              data: dict[str, str] | None = None) -> requests.Response:
        host = urlsplit(url).netloc
        try:
            return self._session.request(method, url, headers=headers, params=params, auth=auth, data=data,
                                         stream=True,
                                         timeout=self._timeout, verify=self._verify(url), allow_redirects=False)
        except (requests.ConnectionError, requests.Timeout) as exc:
            who = f"registry {host}" if host == self.location.host else f"{host} (used by {self.location.host})"
            # An untrusted certificate stays untrusted: retrying the pull cannot help.
            untrusted = any(isinstance(cause, ssl.SSLCertVerificationError) for cause in _causes(exc))
            error = RegistryError if untrusted else RegistryUnreachable
            raise error(f"{who} unreachable: {self._reason(exc)} (while fetching {subject})") from None
        except requests.RequestException as exc:
            raise RegistryError(f"cannot fetch {subject} from {host}: {type(exc).__name__}") from None

    def _verify(self, url: str) -> bool | str:
        # The location's CA file is for the registry itself; token services and blob stores
        # on other hosts carry ordinary public certificates.
        if self.location.cacert and urlsplit(url).netloc == self.location.host:
            return self.location.cacert
        return True

    def _check(self, response: requests.Response, subject: str) -> None:
        """Raise the error class for a failed response (401/403 and 404 are handled by callers)."""
        status = response.status_code
        if status < 300:
            return
        message = _registry_message(response)
        response.close()
        host = self.location.host
        if status == 429:
            raise RegistryUnreachable(f"registry {host} is rate-limiting pulls (HTTP 429) of {subject}; retry later")
        if status >= 500:
            raise RegistryUnreachable(f"registry {host} failed with HTTP {status} for {subject}: {message}")
        if status in (401, 403):
            raise RegistryUnauthorized(f"access to {subject} denied (HTTP {status}): {message}")
        raise RegistryError(f"registry {host} answered HTTP {status} for {subject}: {message}")

    def _reason(self, exc: requests.RequestException) -> str:
        if isinstance(exc, requests.Timeout):
            return _silent_for(self._timeout)
        return describe_network_error(exc, self._timeout)


def describe_network_error(exc: BaseException, timeout: float | None = None) -> str:
    """A short reason for a network failure (``connection refused``), from the innermost cause;
    ``timeout``: the one the request was made with, named when it ran out."""
    for cause in _causes(exc):
        if isinstance(cause, TimeoutError) and timeout is not None:
            return _silent_for(timeout)
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return "cannot resolve the host name"
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted ({cause.verify_message}); set sslcacert for the location"
        if isinstance(cause, ssl.SSLError):
            return f"TLS error ({cause.reason})"
        if isinstance(cause, ConnectionResetError):
            return "connection reset"
        if isinstance(cause, TimeoutError):
            return "timed out"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "connection broken mid-transfer"
    return "connection failed"


def _silent_for(timeout: float) -> str:
    # Names the setting: a registry that is merely slow, not gone, is served by a longer one.
    return f"no answer within {timeout:g} s (RegistryTimeout)"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it wraps: requests and urllib3 nest the socket error several levels deep."""
    pending, seen = [exc], set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        nested = [current.__cause__, current.__context__, getattr(current, "reason", None), *current.args]
        pending.extend(item for item in nested if isinstance(item, BaseException))


def _with_authorization(headers: dict[str, str], authorization: str | None) -> dict[str, str]:
    return {**headers, "Authorization": authorization} if authorization else headers


def _errors(response: requests.Response) -> list[dict[str, Any]]:
    try:
        errors = response.json().get("errors")
    except (ValueError, AttributeError, requests.RequestException):
        return []
    return [error for error in errors if isinstance(error, dict)] if isinstance(errors, list) else []


def _error_codes(response: requests.Response) -> set[str]:
    return {str(error.get("code")) for error in _errors(response)}


def _registry_message(response: requests.Response) -> str:
    """The registry's own error text (``MANIFEST_UNKNOWN: manifest unknown``), else the HTTP reason."""
    parts = [f"{error.get('code')}: {error.get('message')}" for error in _errors(response)]
    return "; ".join(parts) or response.reason or f"HTTP {response.status_code}"


def _chunks(response: requests.Response, subject: str, chunk_size: int, timeout: float) -> Iterator[bytes]:
    """The body of ``response``; a failure to receive it (nothing for ``timeout`` s, say) is RegistryUnreachable,
    naming ``subject``."""
    try:
        yield from response.iter_content(chunk_size)
    except OSError as exc:
        # requests' errors are OSErrors; so is a socket error that escaped them. None may reach
        # the caller as such: the layer cache takes an OSError for a failure of its own disk.
        reason = describe_network_error(exc, timeout)
        raise RegistryUnreachable(f"download of {subject} interrupted: {reason}") from None


def _read_document(response: requests.Response, limit: int, what: str, timeout: float) -> bytes:
    """The body of a manifest, index, config or tag list: held whole, so never more than ``limit`` bytes."""
    chunks, size = [], 0
    with response:
        try:
            for chunk in response.iter_content(65536):
                size += len(chunk)
                if size > limit:
                    raise limit_exceeded(f"{what} is larger than {limit} bytes", "maxManifestBytes", limit)
                chunks.append(chunk)
        except requests.RequestException as exc:
            reason = describe_network_error(exc, timeout)
            raise RegistryUnreachable(f"download of the {what} interrupted: {reason}") from None
    return b"".join(chunks)


def _parse_json(body: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except ValueError:
        raise UnsupportedManifest(f"{what} is not valid JSON") from None
    if not isinstance(document, dict):
        raise UnsupportedManifest(f"{what} is not a JSON object")
    return document


def _media_type(response: requests.Response, document: dict[str, Any], ref: ImageRef) -> str:
    """The manifest's kind, from Content-Type, else its own ``mediaType``, else its shape."""
    media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    if media_type not in _IMAGE_MANIFESTS | _INDEXES | _SCHEMA1:
        media_type = str(document.get("mediaType") or "")
    if not media_type:
        if document.get("schemaVersion") == 1:
            media_type = next(iter(_SCHEMA1))
        elif "manifests" in document:
            media_type = OCI_INDEX
        elif "layers" in document:
            media_type = OCI_MANIFEST
    if media_type in _SCHEMA1:
        raise UnsupportedManifest(
            f"{ref} has a Docker schema 1 manifest, which imagegw cannot pull; "
            "push the image again with a current docker or buildah to get a schema 2 or OCI manifest"
        )
    if media_type not in _IMAGE_MANIFESTS | _INDEXES:
        raise UnsupportedManifest(f"{ref} has a manifest of unsupported type {media_type or 'unknown'!r}")
    return media_type


def _descriptor(entry: Any, what: str, ref: ImageRef) -> LayerDescriptor:
    if not isinstance(entry, dict):
        raise UnsupportedManifest(f"malformed manifest for {ref}: {what} is not a descriptor")
    digest, size, media_type = entry.get("digest"), entry.get("size"), entry.get("mediaType")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise UnsupportedManifest(f"manifest for {ref}: {what} digest {digest!r} is not a sha256 digest")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise UnsupportedManifest(f"malformed manifest for {ref}: {what} {digest} has size {size!r}")
    if not isinstance(media_type, str):
        raise UnsupportedManifest(f"malformed manifest for {ref}: {what} {digest} has no media type")
    return LayerDescriptor(digest, size, media_type)


def _choose_platform(index: dict[str, Any], wanted: PlatformSpec, ref: ImageRef) -> str:
    """The digest of the index entry for ``wanted``; exact variant first, then any variant if none was asked."""
    entries = [entry for entry in index.get("manifests") or () if _is_image_entry(entry)]
    target = _normalized(wanted.os, wanted.architecture, wanted.variant)
    exact = [entry for entry in entries if _entry_platform(entry) == target]
    loose = [entry for entry in entries if _entry_platform(entry)[:2] == target[:2]] if target[2] is None else []
    if exact or loose:
        return _descriptor((exact + loose)[0], f"index entry for {wanted}", ref).digest
    offered = list(dict.fromkeys(_describe(entry) for entry in entries))
    raise NoMatchingPlatform(
        f"no image for {wanted} in {ref} (index offers {', '.join(offered) if offered else 'no images'})"
    )


def _is_image_entry(entry: Any) -> bool:
    """False for attestations and other non-runnable entries (``unknown/unknown``)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("platform"), dict):
        return False
    platform = entry["platform"]
    annotations = entry.get("annotations") or {}
    return (
        platform.get("os") not in (None, "", "unknown")
        and platform.get("architecture") not in (None, "", "unknown")
        and annotations.get("vnd.docker.reference.type") != "attestation-manifest"
    )


def _entry_platform(entry: dict[str, Any]) -> tuple[str, str, str | None]:
    platform = entry["platform"]
    return _normalized(platform["os"], platform["architecture"], platform.get("variant"))


def _normalized(os_name: str, architecture: str, variant: str | None) -> tuple[str, str, str | None]:
    architecture = _ARCH_ALIASES.get(architecture, architecture)
    # v8 is the only arm64 variant in use; indexes and platforms write it or leave it out.
    if architecture == "arm64" and variant == "v8":
        variant = None
    return os_name, architecture, variant or None


def _describe(entry: dict[str, Any]) -> str:
    platform = entry["platform"]
    return "/".join(str(part) for part in (platform["os"], platform["architecture"], platform.get("variant")) if part)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
