"""Build OCI / Docker images in memory and push them over the registry HTTP API.

Nothing here needs docker or skopeo: layers are built with :class:`LayerBuilder`
(tar members in insertion order, hostile entries allowed), configs and manifests
are assembled as JSON, and blobs are uploaded with a monolithic POST + PUT.

Authentication follows the registry's challenge: Basic credentials are sent after a
``Basic`` challenge; after a ``Bearer`` challenge a token is fetched from the realm
(with Basic credentials if any) and the request is retried.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from posixpath import basename, dirname, join
from typing import Any
from urllib.parse import urljoin

import requests
import zstandard

from testsupport.registry import RunningRegistry

# A fixed timestamp keeps images reproducible: the same inputs give the same digests.
CREATED = "2024-01-01T00:00:00Z"
MTIME = 1704067200  # CREATED as a Unix time
DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
HTTP_TIMEOUT = 30

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

LAYER_MEDIA_TYPES: dict[str, dict[str, str]] = {
    "oci": {
        "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
        "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
        "none": "application/vnd.oci.image.layer.v1.tar",
    },
    "docker": {
        "gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "none": "application/vnd.docker.image.rootfs.diff.tar",
    },
}
MANIFEST_MEDIA_TYPES = {"oci": (OCI_MANIFEST, OCI_CONFIG), "docker": (DOCKER_MANIFEST, DOCKER_CONFIG)}
INDEX_MEDIA_TYPES = {"oci": OCI_INDEX, "docker": DOCKER_MANIFEST_LIST}
ALL_MANIFEST_TYPES = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST])


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    """Compact, key-sorted JSON bytes (stable digests)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- layers


class LayerBuilder:
    """Fluent builder of one uncompressed layer tar.

    Paths are tar member names, used exactly as given (no leading-slash stripping,
    no implicit parent directories), so tests can build hostile layers too.
    All members are owned by root:root with a fixed mtime.
    """

    def __init__(self) -> None:
        self._members: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def _add(self, name: str, kind: bytes, mode: int, *, linkname: str = "", data: bytes | None = None) -> LayerBuilder:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.mtime = MTIME
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.linkname = linkname
        info.size = len(data) if data is not None else 0
        self._members.append((info, data))
        return self

    def file(self, path: str, data: bytes = b"", mode: int = 0o644) -> LayerBuilder:
        """A regular file with ``data``."""
        return self._add(path, tarfile.REGTYPE, mode, data=data)

    def dir(self, path: str, mode: int = 0o755) -> LayerBuilder:
        """A directory (tarfile appends the trailing ``/``)."""
        return self._add(path, tarfile.DIRTYPE, mode)

    def symlink(self, path: str, target: str) -> LayerBuilder:
        """A symbolic link ``path -> target``."""
        return self._add(path, tarfile.SYMTYPE, 0o777, linkname=target)

    def hardlink(self, path: str, target: str) -> LayerBuilder:
        """A hard link to the earlier member ``target``."""
        return self._add(path, tarfile.LNKTYPE, 0o644, linkname=target)

    def whiteout(self, path: str) -> LayerBuilder:
        """Delete ``path`` from lower layers: adds ``<dir>/.wh.<name>``."""
        stripped = path.rstrip("/")
        return self._add(join(dirname(stripped), ".wh." + basename(stripped)), tarfile.REGTYPE, 0o644, data=b"")

    def opaque(self, dir_path: str) -> LayerBuilder:
        """Hide the lower layers' content of ``dir_path``: adds ``<dir>/.wh..wh..opq``."""
        return self._add(join(dir_path, ".wh..wh..opq"), tarfile.REGTYPE, 0o644, data=b"")

    def fifo(self, path: str) -> LayerBuilder:
        """A named pipe."""
        return self._add(path, tarfile.FIFOTYPE, 0o644)

    def chardev(self, path: str, major: int = 1, minor: int = 3) -> LayerBuilder:
        """A character device (default 1:3, /dev/null)."""
        self._add(path, tarfile.CHRTYPE, 0o666)
        info = self._members[-1][0]
        info.devmajor, info.devminor = major, minor
        return self

    def raw(self, info: tarfile.TarInfo, data: bytes | None = None) -> LayerBuilder:
        """Append ``info`` exactly as given (a copy); ``info.size`` must match ``data``."""
        if data is not None and info.size != len(data):
            raise ValueError(f"raw({info.name!r}): info.size={info.size} but {len(data)} data bytes")
        if data is None and info.isreg() and info.size:
            raise ValueError(f"raw({info.name!r}): info.size={info.size} but no data")
        self._members.append((copy.copy(info), data))
        return self

    def tar(self) -> bytes:
        """The layer as an uncompressed PAX tar, members in insertion order."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for info, data in self._members:
                archive.addfile(info, io.BytesIO(data) if data is not None else None)
        return buffer.getvalue()

    def __len__(self) -> int:
        return len(self._members)


def compress(data: bytes, compression: str) -> bytes:
    """Compress a layer tar with ``gzip`` (mtime 0), ``zstd`` or ``none``."""
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r} (gzip, zstd or none)")


# --------------------------------------------------------------------------- HTTP


class RegistryError(RuntimeError):
    """A registry or token server answered with an unexpected status."""

    def __init__(self, method: str, url: str, status: int, body: str) -> None:
        super().__init__(f"{method} {url} -> HTTP {status}: {body.strip()[:2000]}")
        self.method = method
        self.url = url
        self.status = status
        self.body = body


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split ``WWW-Authenticate: Bearer realm="...",service="..."`` into scheme and params."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', rest))


def base_url_of(registry: RunningRegistry | str) -> str:
    """The base URL of a registry object or string (``http://`` added if missing)."""
    if isinstance(registry, RunningRegistry):
        return registry.url
    url = registry.rstrip("/")
    return url if "://" in url else f"http://{url}"


class RegistryClient:
    """Minimal registry client answering Basic and Bearer challenges itself."""

    def __init__(self, registry: RunningRegistry | str, auth: tuple[str, str] | None = None) -> None:
        self.base_url = base_url_of(registry)
        if auth is None and isinstance(registry, RunningRegistry):
            auth = registry.credentials
        self.auth = auth
        self.session = requests.Session()
        # Per request: a session-wide verify would lose to $REQUESTS_CA_BUNDLE.
        self._verify: bool | str = True
        if isinstance(registry, RunningRegistry) and registry.tls is not None:
            self._verify = str(registry.tls.ca_cert)
        self._use_basic = False
        self._tokens: dict[str, str] = {}

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        repository: str,
        actions: str = "pull",
        expected: Sequence[int] = (200,),
        **kwargs: Any,
    ) -> requests.Response:
        """Send a request, authenticating on a 401 challenge; raise unless status is expected."""
        url = urljoin(self.base_url + "/", path_or_url)
        scope = f"repository:{repository}:{actions}"
        response = self._send(method, url, scope, **kwargs)
        if response.status_code == 401 and self._answer_challenge(response, scope):
            response = self._send(method, url, scope, **kwargs)
        if response.status_code not in expected:
            raise RegistryError(method, url, response.status_code, response.text)
        return response

    def _send(self, method: str, url: str, scope: str, **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", None) or {})
        auth = None
        if scope in self._tokens:
            headers["Authorization"] = f"Bearer {self._tokens[scope]}"
        elif self._use_basic:
            auth = self.auth
        return self.session.request(method, url, headers=headers, auth=auth, timeout=HTTP_TIMEOUT,
                                    verify=self._verify, **kwargs)

    def _answer_challenge(self, response: requests.Response, scope: str) -> bool:
        """Prepare credentials for a retry; False when retrying cannot help."""
        scheme, params = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            if self.auth is None or self._use_basic:
                return False
            self._use_basic = True
            return True
        if scheme == "bearer" and "realm" in params and scope not in self._tokens:
            self._tokens[scope] = self.fetch_token(params["realm"], params.get("service"), scope)
            return True
        return False

    def fetch_token(self, realm: str, service: str | None, scope: str) -> str:
        """GET a token from ``realm`` (with Basic credentials if we have them)."""
        query = {"scope": scope} | ({"service": service} if service else {})
        response = self.session.get(realm, params=query, auth=self.auth, timeout=HTTP_TIMEOUT)
        if response.status_code != 200:
            raise RegistryError("GET", response.url, response.status_code, response.text)
        answer = response.json()
        token = answer.get("token") or answer.get("access_token")
        if not token:
            raise RegistryError("GET", response.url, 200, f"no token in answer: {response.text}")
        return str(token)

    def push_blob(self, repository: str, data: bytes) -> str:
        """Monolithic upload (POST, then PUT with ``?digest=``); returns the digest."""
        digest = sha256_digest(data)
        started = self.request(
            "POST", f"/v2/{repository}/blobs/uploads/", repository=repository,
            actions="pull,push", expected=(202,),
        )
        location = started.headers.get("Location")
        if not location:
            raise RegistryError("POST", started.url, started.status_code, "no Location header")
        self.request(
            "PUT", location, repository=repository, actions="pull,push", expected=(201,),
            params={"digest": digest}, data=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        return digest

    def push_manifest(self, repository: str, reference: str, manifest: bytes, media_type: str) -> str:
        """PUT a manifest under a tag or digest; returns its digest (checked against the registry's)."""
        digest = sha256_digest(manifest)
        response = self.request(
            "PUT", f"/v2/{repository}/manifests/{reference}", repository=repository,
            actions="pull,push", expected=(201,), data=manifest,
            headers={"Content-Type": media_type},
        )
        answered = response.headers.get("Docker-Content-Digest")
        if answered and answered != digest:
            raise RegistryError("PUT", response.url, 201, f"registry says digest {answered}, expected {digest}")
        return digest

    def get_manifest(self, repository: str, reference: str) -> tuple[bytes, str]:
        """GET a manifest (any of the four media types); returns (bytes, media type)."""
        response = self.request(
            "GET", f"/v2/{repository}/manifests/{reference}", repository=repository,
            headers={"Accept": ALL_MANIFEST_TYPES},
        )
        return response.content, response.headers.get("Content-Type", "")

    def get_blob(self, repository: str, digest: str) -> bytes:
        """GET a blob's bytes."""
        return self.request("GET", f"/v2/{repository}/blobs/{digest}", repository=repository).content


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class BuiltImage:
    """What :func:`push_image` pushed (everything a test needs to check a pull)."""

    repository: str
    manifest_digest: str
    manifest_media_type: str
    manifest: bytes
    manifest_size: int
    config: dict[str, Any]
    layer_digests: list[str]  # compressed blob digests, bottom layer first
    diff_ids: list[str]  # uncompressed tar digests
    config_digest: str = ""
    tag: str | None = None
    layer_media_types: list[str] = field(default_factory=list)

    @property
    def reference(self) -> str:
        """``repository:tag``, or ``repository@digest`` when pushed without a tag."""
        return f"{self.repository}:{self.tag}" if self.tag else f"{self.repository}@{self.manifest_digest}"

    @property
    def platform(self) -> dict[str, str]:
        """``{"os", "architecture"[, "variant"]}`` from the config."""
        keys = ("architecture", "os", "variant")
        return {k: self.config[k] for k in keys if self.config.get(k)}


def _compressions(compression: str | list[str], count: int, media: str) -> list[str]:
    """Per-layer compression list, validated against the manifest flavour."""
    if media not in MANIFEST_MEDIA_TYPES:
        raise ValueError(f"media must be 'oci' or 'docker', not {media!r}")
    per_layer = [compression] * count if isinstance(compression, str) else list(compression)
    if len(per_layer) != count:
        raise ValueError(f"{len(per_layer)} compressions given for {count} layers")
    for name in per_layer:
        if name not in LAYER_MEDIA_TYPES["oci"]:
            raise ValueError(f"unknown compression {name!r} (gzip, zstd or none)")
        if name not in LAYER_MEDIA_TYPES[media]:
            raise ValueError(f"{name} layers are not allowed in {media} manifests")
    return per_layer


def image_config(
    diff_ids: list[str],
    *,
    env: list[str] | None,
    entrypoint: list[str] | None,
    cmd: list[str] | None,
    workdir: str | None,
    labels: dict[str, str] | None,
    architecture: str,
    os: str,
    variant: str | None,
) -> dict[str, Any]:
    """The image config JSON (OCI and Docker share the layout). ``env=None`` means a default PATH."""
    runtime: dict[str, Any] = {"Env": list(DEFAULT_ENV if env is None else env)}
    if entrypoint is not None:
        runtime["Entrypoint"] = list(entrypoint)
    if cmd is not None:
        runtime["Cmd"] = list(cmd)
    if workdir is not None:
        runtime["WorkingDir"] = workdir
    if labels:
        runtime["Labels"] = dict(labels)
    config: dict[str, Any] = {
        "created": CREATED,
        "architecture": architecture,
        "os": os,
        "config": runtime,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": CREATED, "created_by": f"testsupport: layer {i}"} for i in range(len(diff_ids))
        ],
    }
    if variant:
        config["variant"] = variant
    return config


def push_image(
    registry: RunningRegistry | str,
    repository: str,
    tag: str | None,
    layers: list[LayerBuilder | bytes],
    *,
    compression: str | list[str] = "gzip",
    media: str = "oci",
    env: list[str] | None = None,
    entrypoint: list[str] | None = None,
    cmd: list[str] | None = None,
    workdir: str | None = None,
    labels: dict[str, str] | None = None,
    architecture: str = "amd64",
    os: str = "linux",
    variant: str | None = None,
    auth: tuple[str, str] | None = None,
) -> BuiltImage:
    """Build an image from ``layers`` (builders or raw uncompressed tar bytes) and push it.

    ``compression`` is one name or one per layer (gzip, zstd, none); ``media`` is
    ``oci`` or ``docker`` (docker forbids zstd). ``tag=None`` pushes by digest only.
    ``env=None`` gives a default PATH; pass ``[]`` for an empty environment.
    """
    per_layer = _compressions(compression, len(layers), media)
    manifest_type, config_type = MANIFEST_MEDIA_TYPES[media]
    client = RegistryClient(registry, auth)
    descriptors, diff_ids, layer_types = [], [], []
    for layer, name in zip(layers, per_layer):
        tar_bytes = layer.tar() if isinstance(layer, LayerBuilder) else bytes(layer)
        blob = compress(tar_bytes, name)
        diff_ids.append(sha256_digest(tar_bytes))
        layer_types.append(LAYER_MEDIA_TYPES[media][name])
        descriptors.append(
            {"mediaType": layer_types[-1], "digest": client.push_blob(repository, blob), "size": len(blob)}
        )
    config = image_config(
        diff_ids, env=env, entrypoint=entrypoint, cmd=cmd, workdir=workdir, labels=labels,
        architecture=architecture, os=os, variant=variant,
    )
    config_bytes = canonical_json(config)
    config_digest = client.push_blob(repository, config_bytes)
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": {"mediaType": config_type, "digest": config_digest, "size": len(config_bytes)},
            "layers": descriptors,
        }
    )
    digest = client.push_manifest(repository, tag or sha256_digest(manifest), manifest, manifest_type)
    return BuiltImage(
        repository=repository,
        manifest_digest=digest,
        manifest_media_type=manifest_type,
        manifest=manifest,
        manifest_size=len(manifest),
        config=config,
        layer_digests=[d["digest"] for d in descriptors],
        diff_ids=diff_ids,
        config_digest=config_digest,
        tag=tag,
        layer_media_types=layer_types,
    )


def push_index(
    registry: RunningRegistry | str,
    repository: str,
    tag: str,
    images: list[BuiltImage],
    *,
    media: str = "oci",
    auth: tuple[str, str] | None = None,
) -> str:
    """Push an OCI image index (``oci``) or Docker manifest list (``docker``) of ``images``.

    The images must already be in ``repository``; each entry's platform comes from
    the image config. Returns the index digest.
    """
    if media not in INDEX_MEDIA_TYPES:
        raise ValueError(f"media must be 'oci' or 'docker', not {media!r}")
    for image in images:
        if image.repository != repository:
            raise ValueError(f"{image.reference} was pushed to {image.repository!r}, not {repository!r}")
    index_type = INDEX_MEDIA_TYPES[media]
    index = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": index_type,
            "manifests": [
                {
                    "mediaType": image.manifest_media_type,
                    "digest": image.manifest_digest,
                    "size": image.manifest_size,
                    "platform": image.platform,
                }
                for image in images
            ],
        }
    )
    return RegistryClient(registry, auth).push_manifest(repository, tag, index, index_type)


def push_blob(
    registry: RunningRegistry | str,
    repository: str,
    data: bytes,
    auth: tuple[str, str] | None = None,
) -> str:
    """Upload ``data`` as a blob of ``repository`` (monolithic POST + PUT); returns its digest."""
    return RegistryClient(registry, auth).push_blob(repository, data)


def fetch_manifest(
    registry: RunningRegistry | str, repository: str, reference: str, auth: tuple[str, str] | None = None
) -> tuple[bytes, str]:
    """GET a manifest or index (authenticating as needed); returns (bytes, media type)."""
    return RegistryClient(registry, auth).get_manifest(repository, reference)


def fetch_blob(
    registry: RunningRegistry | str, repository: str, digest: str, auth: tuple[str, str] | None = None
) -> bytes:
    """GET a blob (authenticating as needed)."""
    return RegistryClient(registry, auth).get_blob(repository, digest)


# --------------------------------------------------------------------------- demo image

HELLO_SCRIPT = b"""#!/bin/sh
# Greets whoever runs the container; GREETING comes from the image environment.
echo "${GREETING:-Hello} from $(cat /etc/hostname 2>/dev/null || echo imagegw-demo)"
echo "running as $(id -un 2>/dev/null || echo unknown) in $PWD"
"""

ENTRYPOINT_SCRIPT = b"""#!/bin/sh
# Entrypoint: reports the site from the environment, then runs the command.
echo "imagegw demo image for ${DEMO_SITE:-unknown site}" >&2
exec "$@"
"""

OS_RELEASE = b"""PRETTY_NAME="imagegw demo 1.0"
NAME="imagegw-demo"
VERSION_ID="1.0"
VERSION="1.0 (demo)"
ID=imagegw-demo
HOME_URL="https://example.invalid/imagegw"
"""

README = b"""imagegw demo image
==================

A two-layer test image built by testsupport.images. Run /bin/hello.
The second layer removes /usr/share/doc/CHANGES from the first one.
"""

SAMPLE_ENV = [*DEFAULT_ENV, "GREETING=Hello", "DEMO_SITE=imagegw-test"]
SAMPLE_ENTRYPOINT = ["/usr/local/bin/entrypoint.sh"]
SAMPLE_CMD = ["/bin/hello"]


def sample_image_layers() -> list[LayerBuilder]:
    """Two realistic-looking layers; the second deletes ``usr/share/doc/CHANGES``.

    Meant for ``push_image(..., env=SAMPLE_ENV, entrypoint=SAMPLE_ENTRYPOINT, cmd=SAMPLE_CMD)``.
    """
    base = (
        LayerBuilder()
        .dir("bin").dir("etc").dir("tmp", 0o1777).dir("usr").dir("usr/bin")
        .dir("usr/share").dir("usr/share/doc")
        .file("bin/hello", HELLO_SCRIPT, 0o755)
        .file("etc/os-release", OS_RELEASE)
        .file("etc/hostname", b"imagegw-demo\n")
        .file("usr/share/doc/README", README)
        .file("usr/share/doc/CHANGES", b"1.0: first demo release\n")
        .symlink("usr/bin/hello", "../../bin/hello")
    )
    app = (
        LayerBuilder()
        .dir("usr/local").dir("usr/local/bin")
        .file("usr/local/bin/entrypoint.sh", ENTRYPOINT_SCRIPT, 0o755)
        .file("etc/motd", b"Welcome to the imagegw demo image.\n")
        .whiteout("usr/share/doc/CHANGES")
    )
    return [base, app]
