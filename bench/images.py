"""Build realistic images on this machine, without internet, and push them to a local registry.

Everything comes from the package registries the machine reaches: the Debian base is
``debootstrap`` from the apt mirror in ``/etc/apt/sources.list(.d)``, the other layers are
Python packages installed from PyPI with ``pip install --target``. Each layer is written as a
tar streamed from a directory (sorted, numeric owners, hard links kept) through ``pigz -6``
to ``<workdir>/layers/<name>.tar.gz``; its digest and diff_id are computed on the way.
Layers are built once and reused across runs and images (medium and large share theirs).

Images (uncompressed size of the flattened tree, roughly):

* ``small``  ~ 80 MB: Debian bookworm minbase slimmed like ``debian:bookworm-slim``, a layer of
  pure-Python packages, and a top layer with whiteouts and opaque directories;
* ``medium`` ~ 350 MB: minbase + python3, numpy and scipy, the same kind of top layer
  (which also deletes the packages' ``tests`` directories);
* ``large``  ~ 1.3 GB: medium's first two layers, pandas, PyTorch (CPU) with its dependencies,
  and a top layer.

Each also has a ``sibling`` tag: the same layers but a different, tiny top layer, to show
that a second image sharing base layers does not fetch them again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import requests

CREATED = "2024-01-01T00:00:00Z"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
SITE = "usr/local/lib/python3.11/dist-packages"
PIP = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps"]
SUITE = "bookworm"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- what the images hold


@dataclass(frozen=True)
class LayerSpec:
    """How to make one layer: a debootstrap rootfs, a ``pip install --target`` of ``args``, or
    a "top" layer written member by member (whiteouts, opaque directories, new files)."""

    name: str
    kind: str  # "debootstrap", "pip", "top"
    args: tuple[str, ...] = ()
    slim: bool = False


@dataclass(frozen=True)
class ImageSpec:
    size: str
    layers: tuple[LayerSpec, ...]

    @property
    def repository(self) -> str:
        return f"bench/{self.size}"


SMALL_PIP = ("requests==2.32.3", "urllib3==2.2.3", "idna==3.10", "certifi==2024.8.30",
             "charset-normalizer==3.4.0", "click==8.1.7", "pyyaml==6.0.2")
NUMPY_SCIPY_PIP = ("numpy==2.1.3", "scipy==1.14.1")
PANDAS_PIP = ("pandas==2.2.3", "python-dateutil==2.9.0.post0", "pytz==2024.2", "tzdata==2024.2", "six==1.16.0")
TORCH_PIP = ("torch==2.13.0", "sympy==1.13.3", "mpmath==1.3.0", "networkx==3.4.2", "jinja2==3.1.4",
             "markupsafe==3.0.2", "filelock==3.16.1", "fsspec==2024.10.0", "typing-extensions==4.12.2")

BASE_SLIM = LayerSpec("base-slim", "debootstrap", ("--variant=minbase",), slim=True)
BASE_PYTHON = LayerSpec("base-python", "debootstrap", ("--variant=minbase", "--include=python3,ca-certificates"))
NUMPY_SCIPY = LayerSpec("numpy-scipy", "pip", NUMPY_SCIPY_PIP)
IMAGES: dict[str, ImageSpec] = {
    "small": ImageSpec("small", (BASE_SLIM, LayerSpec("pylibs", "pip", SMALL_PIP), LayerSpec("top-small", "top"))),
    "medium": ImageSpec("medium", (BASE_PYTHON, NUMPY_SCIPY, LayerSpec("top-medium", "top"))),
    "large": ImageSpec("large", (BASE_PYTHON, NUMPY_SCIPY, LayerSpec("pandas", "pip", PANDAS_PIP),
                                 LayerSpec("torch", "pip", TORCH_PIP), LayerSpec("top-large", "top"))),
}
SIZES = tuple(IMAGES)


# --------------------------------------------------------------------------- built layers and images


@dataclass
class BuiltLayer:
    name: str
    digest: str  # of the gzip blob
    diff_id: str  # of the uncompressed tar
    size: int  # bytes of the blob
    tar_size: int  # bytes of the uncompressed tar
    path: Path  # the blob on disk

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "digest": self.digest, "diff_id": self.diff_id, "size": self.size,
                "tar_size": self.tar_size, "path": str(self.path)}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> BuiltLayer:
        return cls(value["name"], value["digest"], value["diff_id"], value["size"], value["tar_size"],
                   Path(value["path"]))


@dataclass
class BuiltImage:
    size: str
    repository: str
    tag: str
    layers: list[BuiltLayer]
    config: bytes
    manifest: bytes

    @property
    def manifest_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest).hexdigest()

    def reference(self, host: str) -> str:
        return f"{host}/{self.repository}:{self.tag}"

    @property
    def blob_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def tar_bytes(self) -> int:
        return sum(layer.tar_size for layer in self.layers)


# --------------------------------------------------------------------------- streaming a tar through pigz


class _HashingSink:
    """A write-only file object that hashes what goes through it into ``target``."""

    def __init__(self, target: IO[bytes]) -> None:
        self.target = target
        self.hash = hashlib.sha256()
        self.count = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.count += len(data)
        self.target.write(data)
        return len(data)

    def flush(self) -> None:
        self.target.flush()


class LayerWriter:
    """A tar archive whose bytes go through ``pigz -6`` into ``path``, hashed on both sides."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.partial = path.with_suffix(".partial")
        self._out = open(self.partial, "wb")  # noqa: SIM115 - closed in close()
        self._pigz = subprocess.Popen(["pigz", "-6", "-n", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._blob_hash = hashlib.sha256()
        self._blob_size = 0
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        assert self._pigz.stdin is not None
        self._sink = _HashingSink(self._pigz.stdin)
        self.tar = tarfile.open(fileobj=self._sink, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self.names: list[str] = []

    def _drain(self) -> None:
        assert self._pigz.stdout is not None
        while chunk := self._pigz.stdout.read(1 << 20):
            self._blob_hash.update(chunk)
            self._blob_size += len(chunk)
            self._out.write(chunk)

    def add(self, info: tarfile.TarInfo, data: IO[bytes] | None = None) -> None:
        self.names.append(info.name)
        self.tar.addfile(info, data)

    def close(self, name: str) -> BuiltLayer:
        self.tar.close()
        assert self._pigz.stdin is not None
        self._pigz.stdin.close()
        self._reader.join()
        if self._pigz.wait() != 0:
            raise RuntimeError(f"pigz failed writing {self.path}")
        self._out.close()
        digest = "sha256:" + self._blob_hash.hexdigest()
        final = self.path.parent / f"{name}.tar.gz"
        os.replace(self.partial, final)
        return BuiltLayer(name, digest, "sha256:" + self._sink.hash.hexdigest(), self._blob_size,
                          self._sink.count, final)


def _walk_sorted(root: Path) -> Iterable[tuple[Path, str]]:
    """Every path under ``root`` (not root itself), parents first, names sorted bytewise."""
    stack = [(root, "")]
    while stack:
        directory, prefix = stack.pop()
        with os.scandir(directory) as entries:
            names = sorted((entry.name for entry in entries), key=os.fsencode)
        children = []
        for name in names:
            path = directory / name
            arcname = f"{prefix}{name}"
            yield path, arcname
            if path.is_dir() and not path.is_symlink():
                children.append((path, arcname + "/"))
        stack.extend(reversed(children))


def tar_directory(writer: LayerWriter, root: Path, *, skip_content_of: Iterable[str] = ()) -> None:
    """Add ``root``'s tree to the layer: numeric owners, real modes and mtimes, hard links as links.

    ``skip_content_of`` names directories kept empty (``dev``, ``proc``... as images ship them).
    """
    skipped = {name.strip("/") for name in skip_content_of}
    seen_inodes: dict[tuple[int, int], str] = {}
    for path, arcname in _walk_sorted(root):
        if any(arcname.startswith(prefix + "/") for prefix in skipped):
            continue
        st = path.lstat()
        info = tarfile.TarInfo(arcname)
        info.mode = stat.S_IMODE(st.st_mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        info.mtime = int(st.st_mtime)
        data = None
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(st.st_mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            inode = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and inode in seen_inodes:
                info.type = tarfile.LNKTYPE
                info.linkname = seen_inodes[inode]
            else:
                if st.st_nlink > 1:
                    seen_inodes[inode] = arcname
                info.type = tarfile.REGTYPE
                info.size = st.st_size
                data = path.open("rb")
        elif stat.S_ISFIFO(st.st_mode):
            info.type = tarfile.FIFOTYPE
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        else:  # sockets cannot be in a tar
            continue
        try:
            writer.add(info, data)
        finally:
            if data is not None:
                data.close()


# --------------------------------------------------------------------------- making layer contents


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 sources or the one-line format)."""
    candidates: list[Path] = [Path("/etc/apt/sources.list")]
    directory = Path("/etc/apt/sources.list.d")
    if directory.is_dir():
        candidates += sorted(directory.glob("*.sources")) + sorted(directory.glob("*.list"))
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE))
                suites = fields.get("Suites", "").split()
                if SUITE in suites and "deb" in fields.get("Types", "").split() \
                        and fields.get("Enabled", "yes") != "no":
                    return fields["URIs"].split()[0]
        else:
            for line in text.splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "deb":
                    url = next((p for p in parts[1:] if "://" in p), None)
                    if url and SUITE in parts:
                        return url
    return "http://deb.debian.org/debian"


def run(command: list[str], **kwargs: Any) -> None:
    started = time.monotonic()
    done = subprocess.run(command, check=False, **kwargs)
    if done.returncode != 0:
        output = done.stdout.decode(errors="replace")[-3000:] if isinstance(done.stdout, bytes) else ""
        raise RuntimeError(f"{' '.join(command)} failed with exit code {done.returncode}\n{output}")
    log(f"  {Path(command[0]).name} ... took {time.monotonic() - started:.0f} s")


def make_debootstrap(spec: LayerSpec, target: Path, workdir: Path) -> None:
    cache = workdir / "debcache"
    cache.mkdir(parents=True, exist_ok=True)
    mirror = apt_mirror()
    log(f"  debootstrap {' '.join(spec.args)} {SUITE} from {mirror}")
    run(["debootstrap", *spec.args, f"--cache-dir={cache}", SUITE, str(target), mirror],
        stdout=subprocess.DEVNULL)
    # What an image build leaves behind: no package lists, no downloaded debs, no logs of the build.
    for pattern in ("var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb",
                    "var/log/bootstrap.log", "debootstrap"):
        for path in target.glob(pattern):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if spec.slim:  # like debian:bookworm-slim: no manuals, info pages or translations
        for pattern in ("usr/share/man/*", "usr/share/info/*", "usr/share/locale/*", "usr/share/doc/*/*"):
            for path in target.glob(pattern):
                if path.name == "copyright":
                    continue
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def make_pip(spec: LayerSpec, target: Path, workdir: Path) -> None:
    site = target / SITE
    site.mkdir(parents=True)
    env = {**os.environ, "PIP_CACHE_DIR": str(workdir / "pipcache")}
    log(f"  pip install --target /{SITE} {' '.join(spec.args)}")
    # pip warns about this machine's optional local indexes; show its output only when it fails.
    run([*PIP, "--target", str(site), *spec.args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _entry(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, size: int = 0,
           linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.linkname = kind, mode, size, linkname
    info.mtime = 1704067200
    info.uname = info.gname = ""
    return info


def _add_file(writer: LayerWriter, name: str, data: bytes, mode: int = 0o644) -> None:
    writer.add(_entry(name, size=len(data), mode=mode), io.BytesIO(data))


def write_top_layer(writer: LayerWriter, lower: list[set[str]], variant: str) -> dict[str, int]:
    """The top layer: deletions (whiteouts) of lower files and directories, two opaque directories,
    new and replaced files, a hard link. Returns counts of what it holds."""
    below: set[str] = set().union(*lower)
    counts = {"whiteouts": 0, "opaque": 0}

    def whiteout(path: str) -> None:
        parent, _, base = path.rpartition("/")
        writer.add(_entry(f"{parent}/.wh.{base}" if parent else f".wh.{base}"))
        counts["whiteouts"] += 1

    # Deleted directories: the packages' test suites (topmost "tests" directory of each subtree).
    test_dirs = sorted(p for p in below if p.startswith(SITE + "/") and p.rsplit("/", 1)[-1] == "tests"
                       and not p.startswith(SITE + "/torch/"))
    kept: list[str] = []
    for path in test_dirs:
        if not any(path.startswith(parent + "/") for parent in kept):
            kept.append(path)
    # Deleted files: build logs and debconf's backups, and the compiled caches of one package.
    files = sorted(p for p in below if re.fullmatch(r"var/log/[^/]+\.log|var/cache/debconf/[^/]+-old", p))
    pycache = sorted(p for p in below if p.startswith(SITE + "/pandas/io/") and p.endswith(".pyc"))[:200]
    for path in kept + files + pycache:
        whiteout(path)
    # Opaque directories: all the docs replaced by one README, and apt's settings replaced by one file.
    for directory, new_file, data in (
        ("usr/share/doc", "README.bench", b"Documentation was removed from this image.\n"),
        ("etc/apt/apt.conf.d", "99bench", b'APT::Install-Recommends "false";\n'),
    ):
        writer.add(_entry(directory, tarfile.DIRTYPE, 0o755))
        writer.add(_entry(f"{directory}/.wh..wh..opq"))
        _add_file(writer, f"{directory}/{new_file}", data)
        counts["opaque"] += 1
    # New and replaced files, and a hard link.
    _add_file(writer, "etc/motd", f"bench image ({variant})\n".encode())
    writer.add(_entry("opt", tarfile.DIRTYPE, 0o755))
    writer.add(_entry("opt/bench", tarfile.DIRTYPE, 0o755))
    script = b"#!/bin/sh\necho hello from the bench image\n"
    _add_file(writer, "opt/bench/hello", script, 0o755)
    writer.add(_entry("opt/bench/hello-again", tarfile.LNKTYPE, 0o755, linkname="opt/bench/hello"))
    noise = random.Random(variant).randbytes(3 << 20)  # incompressible data, different in each variant
    writer.add(_entry("opt/bench/data.bin", size=len(noise)), io.BytesIO(noise))
    return counts


# --------------------------------------------------------------------------- building with a cache


class ImageBuilder:
    """Builds layers under ``<workdir>/layers`` once and assembles images from them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.layer_dir = workdir / "layers"
        self.layer_dir.mkdir(parents=True, exist_ok=True)
        self.scratch = workdir / "build"

    def _record(self, name: str) -> Path:
        return self.layer_dir / f"{name}.json"

    def _names(self, name: str) -> Path:
        return self.layer_dir / f"{name}.names"

    def layer(self, spec: LayerSpec, lower: list[str], variant: str) -> BuiltLayer:
        record = self._record(spec.name)
        if record.exists():
            layer = BuiltLayer.from_json(json.loads(record.read_text()))
            layer.path = self.layer_dir / f"{spec.name}.tar.gz"  # the workdir may have moved
            if layer.path.exists() and layer.path.stat().st_size == layer.size:
                return layer
        log(f"building layer {spec.name}")
        started = time.monotonic()
        writer = LayerWriter(self.layer_dir / f"{spec.name}.tar.gz")
        counts: dict[str, int] = {}
        if spec.kind == "top":
            counts = write_top_layer(writer, [self.layer_names(name) for name in lower], variant)
        else:
            source = self.scratch / spec.name
            if source.exists():
                shutil.rmtree(source)
            source.mkdir(parents=True)
            try:
                if spec.kind == "debootstrap":
                    make_debootstrap(spec, source, self.workdir)
                    tar_directory(writer, source, skip_content_of=("dev", "proc", "sys", "run", "tmp"))
                else:
                    make_pip(spec, source, self.workdir)
                    tar_directory(writer, source)
            finally:
                shutil.rmtree(source, ignore_errors=True)
        layer = writer.close(spec.name)
        self._names(spec.name).write_text("\n".join(n.rstrip("/") for n in writer.names) + "\n")
        record.write_text(json.dumps({**layer.to_json(), "counts": counts}, indent=1))
        log(f"layer {spec.name}: {layer.tar_size / 1e6:.0f} MB tar, {layer.size / 1e6:.0f} MB gzip, "
            f"{len(writer.names)} entries, {time.monotonic() - started:.0f} s")
        return layer

    def layer_names(self, name: str) -> set[str]:
        return set(self._names(name).read_text().split("\n")) - {""}

    def image(self, size: str, *, sibling: bool = False) -> BuiltImage:
        spec = IMAGES[size]
        layer_specs = list(spec.layers)
        if sibling:
            layer_specs[-1] = LayerSpec(f"top-{size}-sibling", "top")
        layers: list[BuiltLayer] = []
        for index, layer_spec in enumerate(layer_specs):
            lower = [s.name for s in layer_specs[:index]]
            layers.append(self.layer(layer_spec, lower, layer_spec.name))
        config = json.dumps({
            "created": CREATED, "architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                               "PYTHONDONTWRITEBYTECODE=1"],
                       "Cmd": ["/bin/bash"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": [{"created": CREATED, "created_by": f"bench layer {layer.name}"} for layer in layers],
        }, sort_keys=True, separators=(",", ":")).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                       "size": len(config)},
            "layers": [{"mediaType": GZIP_LAYER, "digest": layer.digest, "size": layer.size} for layer in layers],
        }, sort_keys=True, separators=(",", ":")).encode()
        return BuiltImage(size, spec.repository, "sibling" if sibling else "1", layers, config, manifest)


# --------------------------------------------------------------------------- pushing, streamed from disk


class Pusher:
    """Pushes blobs (monolithic upload streamed from the file) and manifests to an anonymous registry."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()

    def has_blob(self, repository: str, digest: str) -> bool:
        response = self.session.head(f"{self.base_url}/v2/{repository}/blobs/{digest}", timeout=30)
        return response.status_code == 200

    def push_blob(self, repository: str, digest: str, source: Path | bytes) -> bool:
        """Upload unless present; True when it uploaded."""
        if self.has_blob(repository, digest):
            return False
        started = self.session.post(f"{self.base_url}/v2/{repository}/blobs/uploads/", timeout=30)
        if started.status_code != 202:
            raise RuntimeError(f"POST upload for {repository}: HTTP {started.status_code} {started.text[:300]}")
        location = started.headers["Location"]
        if location.startswith("/"):
            location = self.base_url + location
        separator = "&" if "?" in location else "?"
        if isinstance(source, Path):
            with source.open("rb") as body:
                response = self.session.put(f"{location}{separator}digest={digest}", data=body, timeout=3600,
                                            headers={"Content-Type": "application/octet-stream",
                                                     "Content-Length": str(source.stat().st_size)})
        else:
            response = self.session.put(f"{location}{separator}digest={digest}", data=source, timeout=600,
                                        headers={"Content-Type": "application/octet-stream"})
        if response.status_code != 201:
            raise RuntimeError(f"PUT blob {digest}: HTTP {response.status_code} {response.text[:300]}")
        return True

    def push_image(self, image: BuiltImage) -> None:
        uploaded = 0
        for layer in image.layers:
            uploaded += self.push_blob(image.repository, layer.digest, layer.path)
        config_digest = "sha256:" + hashlib.sha256(image.config).hexdigest()
        self.push_blob(image.repository, config_digest, image.config)
        response = self.session.put(f"{self.base_url}/v2/{image.repository}/manifests/{image.tag}",
                                    data=image.manifest, headers={"Content-Type": OCI_MANIFEST}, timeout=60)
        if response.status_code != 201:
            raise RuntimeError(f"PUT manifest {image.repository}:{image.tag}: HTTP {response.status_code} "
                               f"{response.text[:300]}")
        if uploaded:
            log(f"pushed {image.repository}:{image.tag} ({uploaded} new layers)")


def build_and_push(workdir: Path, sizes: Iterable[str], registry_url: str,
                   progress: Callable[[str], None] = log) -> dict[str, tuple[BuiltImage, BuiltImage]]:
    """Build (once) and push each size's image and its sibling; returns {size: (image, sibling)}."""
    builder = ImageBuilder(workdir)
    pusher = Pusher(registry_url)
    images = {}
    for size in sizes:
        image, sibling = builder.image(size), builder.image(size, sibling=True)
        pusher.push_image(image)
        pusher.push_image(sibling)
        progress(f"image {size}: {len(image.layers)} layers, {image.blob_bytes / 1e6:.0f} MB compressed, "
                 f"{image.tar_bytes / 1e6:.0f} MB of layer tars")
        images[size] = (image, sibling)
    return images
