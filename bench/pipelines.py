"""The two pipelines, the services (b) talks to, and the physical floor.

(a) ``skopeo copy`` → ``umoci unpack --rootless`` → ``mksquashfs``, each step timed;
(b) ``imagegw pull`` (the installed console script) to READY, against a Prefect API server and
    an embedded SecantusDB that the benchmark starts once for the whole session.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from bench.images import BuiltImage, log
from bench.measure import Measured, measure, tree_cpu

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
PLATFORM = "bench"
BLOCK_SIZE = 131072
CPUS = os.cpu_count() or 1


# --------------------------------------------------------------------------- compressor settings


@dataclass(frozen=True)
class Compressor:
    algorithm: str
    level: int | None

    @classmethod
    def parse(cls, text: str) -> Compressor:
        algorithm, _, level = text.partition(":")
        if algorithm not in ("gzip", "zstd", "xz", "lz4"):
            raise ValueError(f"unknown compressor {text!r}: gzip[:1-9], zstd[:1-22], xz[:0-9] or lz4")
        return cls(algorithm, int(level) if level else None)

    def __str__(self) -> str:
        return self.algorithm + (f":{self.level}" if self.level is not None else "")

    def mksquashfs_flags(self) -> list[str]:
        flags = ["-comp", self.algorithm]
        # mksquashfs 4.5 has no level for xz (only its dictionary size) and none for lz4.
        if self.level is not None and self.algorithm in ("gzip", "zstd"):
            flags += ["-Xcompression-level", str(self.level)]
        return flags

    def tar2sqfs_flags(self) -> list[str]:
        flags = ["--compressor", self.algorithm]
        if self.level is not None:
            flags += ["--comp-extra", f"level={self.level}"]
        return flags


# --------------------------------------------------------------------------- services for (b)


class PrefectServer:
    """``prefect server start`` on a free loopback port, its home (and SQLite database) in the workdir."""

    def __init__(self, home: Path) -> None:
        from imagegw.processes import free_port

        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.log_path = home / "server.log"
        env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(home), PREFECT_SERVER_API_HOST="127.0.0.1",
                   PREFECT_SERVER_API_PORT=str(self.port), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_UI_ENABLED="false", DO_NOT_TRACK="1")
        started = time.monotonic()
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)
        while True:
            try:
                if requests.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if self.process.poll() is not None or time.monotonic() - started > 240:
                self.stop()
                raise RuntimeError(f"the Prefect server did not start; see {self.log_path}")
            time.sleep(0.5)
        log(f"Prefect server on {self.api_url} ({time.monotonic() - started:.0f} s to start)")

    def cpu(self) -> float:
        return tree_cpu(self.process.pid)

    def last_flow_run(self) -> dict[str, Any] | None:
        response = requests.post(f"{self.api_url}/flow_runs/filter",
                                 json={"sort": "EXPECTED_START_TIME_DESC", "limit": 1}, timeout=10)
        runs = response.json() if response.status_code == 200 else []
        return runs[0] if runs else None

    def stage_times(self, flow_run_id: str) -> dict[str, float]:
        """{task name: seconds} of one flow run's task runs (the pipeline's stages)."""
        response = requests.post(f"{self.api_url}/task_runs/filter",
                                 json={"flow_runs": {"id": {"any_": [flow_run_id]}}, "limit": 200}, timeout=10)
        stages: dict[str, float] = {}
        for run in response.json() if response.status_code == 200 else []:
            name = re.sub(r"-[0-9a-f]{3}$", "", run.get("name", "?"))  # Prefect adds 3 hex digits
            start, end = run.get("start_time"), run.get("end_time")
            if start and end:
                stages[name] = stages.get(name, 0.0) + _seconds_between(start, end)
        return stages

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _seconds_between(start: str, end: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(end)
            - datetime.fromisoformat(start)).total_seconds()


class Database:
    """The gateway's own embedded SecantusDB, started once (as ``imagegw serve`` would) and shared by
    every pull through ``MongoDBURI``, so that no pull pays its start-up."""

    def __init__(self, state: Path) -> None:
        from imagegw.store.embedded import ensure_embedded_server

        self.state = state
        self.server = ensure_embedded_server(state)
        os.environ.pop("IMAGEGW_MONGODB_URI", None)  # the pulls get it from their configuration
        self.uri = self.server.uri
        log(f"SecantusDB on {self.uri}")

    def cpu(self) -> float:
        return tree_cpu(self.server.pid)

    def drop(self, name: str) -> None:
        import pymongo

        client = pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=5000)
        try:
            client.drop_database(name)
        finally:
            client.close()

    def stop(self) -> None:
        from imagegw.store.embedded import stop_embedded_server

        stop_embedded_server(self.server, self.state / "mongo")


# --------------------------------------------------------------------------- results


@dataclass
class RunResult:
    pipeline: str  # "a", "b-cold", "b-warm", "b-repull", "b-sibling"
    size: str
    wall: float
    cpu: float
    peak_rss: int
    output_size: int
    steps: dict[str, float] = field(default_factory=dict)
    """(a): seconds per command; (b): seconds per Prefect task, plus 'process overhead'."""
    server_cpu: float = 0.0
    """(b): CPU the Prefect server and SecantusDB spent meanwhile (not in ``cpu``)."""
    blob_gets: int | None = None
    """Blob GETs the registry logged during the run, layers and config."""
    layer_gets: int | None = None
    """Of those, GETs of the image's layers."""
    shared_blob_gets: int | None = None
    """Of those, GETs of layers the image shares with the one pulled before."""
    output: Path | None = None
    load: float = field(default_factory=lambda: os.getloadavg()[0])
    """The 1-minute load average when the run ended (other work on the machine skews the times)."""

    def to_json(self) -> dict[str, Any]:
        return {key: (str(value) if isinstance(value, Path) else value) for key, value in self.__dict__.items()}


# --------------------------------------------------------------------------- (a)


def run_skopeo_umoci(image: BuiltImage, host: str, compressor: Compressor, run_dir: Path) -> RunResult:
    run_dir.mkdir(parents=True)
    oci, bundle, output = run_dir / "oci", run_dir / "bundle", run_dir / "out.squashfs"
    logfile = run_dir / "commands.log"
    steps = [
        ("skopeo copy", ["skopeo", "--insecure-policy", "copy", "--quiet", "--src-tls-verify=false",
                         f"docker://{image.reference(host)}", f"oci:{oci}:{image.tag}"]),
        ("umoci unpack", ["umoci", "unpack", "--rootless", "--image", f"{oci}:{image.tag}", str(bundle)]),
        ("mksquashfs", ["mksquashfs", str(bundle / "rootfs"), str(output), *compressor.mksquashfs_flags(),
                        "-b", str(BLOCK_SIZE), "-noappend", "-no-xattrs", "-all-root", "-no-progress",
                        "-quiet", "-processors", str(CPUS)]),
    ]
    measured: list[tuple[str, Measured]] = []
    for name, command in steps:
        measured.append((name, measure(command, log=logfile).check()))
    return RunResult("a", image.size, sum(m.wall for _, m in measured), sum(m.cpu for _, m in measured),
                     max(m.peak_rss for _, m in measured), output.stat().st_size,
                     steps={name: m.wall for name, m in measured}, output=output)


# --------------------------------------------------------------------------- (b)


@dataclass
class Gateway:
    """One imagegw configuration: its cache, image directory and database name."""

    run_dir: Path
    registry_url: str
    registry_host: str
    mongo_uri: str
    database: str
    compressor: Compressor
    state_dir: Path
    cache_dir: Path
    image_dir: Path

    @property
    def config_path(self) -> Path:
        return self.run_dir / f"imagemanager-{self.database}.json"

    def write(self) -> Gateway:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps({
            "DefaultImageLocation": self.registry_host,
            "MongoDBURI": self.mongo_uri,
            "MongoDB": self.database,
            "StateDirectory": str(self.state_dir),
            "CacheDirectory": str(self.cache_dir),
            "ExpandDirectory": str(self.run_dir / "expand"),
            "Compression": str(self.compressor),
            "BlockSize": BLOCK_SIZE,
            "Locations": {self.registry_host: {"url": self.registry_url}},
            "Platforms": {PLATFORM: {"accesstype": "local", "local": {"imageDir": str(self.image_dir)}}},
        }, indent=2))
        return self


class BlobCounter:
    """Counts the blob GETs in the registry's access log written since it was created."""

    PATTERN = re.compile(rb'"GET /v2/[^ ]+/blobs/(sha256:[0-9a-f]{64}) HTTP/[0-9.]+" (\d+)')

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.offset = log_path.stat().st_size

    def digests(self) -> list[str]:
        with self.log_path.open("rb") as handle:
            handle.seek(self.offset)
            text = handle.read()
        return [match.group(1).decode() for match in self.PATTERN.finditer(text)]


def run_imagegw(pipeline: str, image: BuiltImage, gateway: Gateway, prefect: PrefectServer, database: Database,
                registry_log: Path, *, layer_digests: set[str] | None = None) -> RunResult:
    """``imagegw pull`` to READY; ``layer_digests`` are the layers whose GETs count as "shared"."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PREFECT_", "IMAGEGW_"))}
    env.update(PREFECT_API_URL=prefect.api_url, PREFECT_HOME=str(prefect.home), DO_NOT_TRACK="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="INFO")
    counter = BlobCounter(registry_log)
    services_before = prefect.cpu() + database.cpu()
    logfile = gateway.run_dir / f"{pipeline}.log"
    result = measure([VENV_BIN / "imagegw", "pull", image.reference(gateway.registry_host), "--platform", PLATFORM,
                      "--config", gateway.config_path], log=logfile, env=env).check()
    services = prefect.cpu() + database.cpu() - services_before
    record = json.loads(result.stdout)
    if record.get("status") != "READY":
        raise RuntimeError(f"imagegw pull of {image.reference(gateway.registry_host)} ended {record.get('status')}")
    squashfs = gateway.image_dir / f"{record['id']}.squashfs"
    gets = counter.digests()
    steps: dict[str, float] = {}
    flow_run = prefect.last_flow_run()
    if flow_run and flow_run.get("start_time") and flow_run.get("end_time"):
        steps = prefect.stage_times(flow_run["id"])
        flow_seconds = _seconds_between(flow_run["start_time"], flow_run["end_time"])
        steps["flow run"] = flow_seconds
        steps["outside the flow run"] = result.wall - flow_seconds
    return RunResult(pipeline, image.size, result.wall, result.cpu, result.peak_rss, squashfs.stat().st_size,
                     steps=steps, server_cpu=services, blob_gets=len(gets),
                     layer_gets=sum(d in {layer.digest for layer in image.layers} for d in gets),
                     shared_blob_gets=sum(d in layer_digests for d in gets) if layer_digests is not None else None,
                     output=squashfs)


def run_api_repull(image: BuiltImage, gateway: Gateway, registry_log: Path, count: int = 20) -> RunResult:
    """Re-pull the READY image through the REST API in one process (``bench/api_repull.py``)."""
    counter = BlobCounter(registry_log)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "IMAGEGW_"))}
    env["PREFECT_HOME"] = str(gateway.run_dir / "prefect-unused")
    result = measure([VENV_BIN / "python", Path(__file__).with_name("api_repull.py"), gateway.config_path,
                      PLATFORM, image.reference(gateway.registry_host), str(count)],
                     log=gateway.run_dir / "api-repull.log", env=env).check()
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    if answer["statuses"] != ["READY"] or answer["launched"]:
        raise RuntimeError(f"the API re-pull did not answer READY at once: {answer}")
    gets = counter.digests()
    return RunResult("b-api-repull", image.size, answer["median"], 0.0, result.peak_rss, 0,
                     steps={"first request": answer["first"], "median request": answer["median"],
                            "process": result.wall}, blob_gets=len(gets),
                     layer_gets=sum(d in {layer.digest for layer in image.layers} for d in gets))


# --------------------------------------------------------------------------- the physical floor


@dataclass
class Floor:
    decompress_serial: float
    decompress_parallel: float
    compress: float
    tree_tar_bytes: int
    decompress_cpu: float = 0.0
    compress_cpu: float = 0.0
    download: float = 0.0
    """The blobs' bytes at the limited link rate (``--bandwidth``), else 0."""

    @property
    def floor(self) -> float:
        return max(self.decompress_parallel, self.compress, self.download)

    @property
    def shared_cores(self) -> float:
        """The least time decompressing and compressing take when they must share this machine's
        cores: their CPU-seconds over the cores (the floor above lets each have all of them)."""
        return max(self.floor, (self.decompress_cpu + self.compress_cpu) / CPUS)

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "floor": self.floor, "shared_cores": self.shared_cores}


def _drop_output(command: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
    return time.monotonic() - started


def measure_floor(blobs: list[Path], squashfs: Path, compressor: Compressor, scratch: Path) -> Floor:
    """(1) decompress the layer blobs alone (serially, and two at a time on the two cores), and
    (2) build the squashfs of the final tree alone with tar2sqfs from a tar already in memory."""
    for blob in blobs:  # in the page cache, as for the pipelines
        _drop_output(["cat", str(blob)])
    # Each measured a few times, the fastest kept: a floor, on a machine that may be busy meanwhile.
    serial, decompress_cpu = min(_with_cpu(lambda: sum(_drop_output(_inflate(blob)) for blob in blobs))
                                 for _ in range(2))
    parallel = min(_decompress_parallel(blobs) for _ in range(2))
    scratch.mkdir(parents=True, exist_ok=True)
    tree_tar = scratch / "tree.tar"
    with tree_tar.open("wb") as out:
        subprocess.run(["sqfs2tar", "--no-skip", "--no-xattr", str(squashfs)], stdout=out, check=True)
    _drop_output(["cat", str(tree_tar)])
    output = scratch / "floor.squashfs"
    compress, compress_cpu = min(_with_cpu(lambda: _compress(tree_tar, output, compressor)) for _ in range(3))
    size = tree_tar.stat().st_size
    tree_tar.unlink()
    output.unlink()
    return Floor(serial, parallel, compress, size, decompress_cpu, compress_cpu)


def _with_cpu(run: Callable[[], float]) -> tuple[float, float]:
    """What ``run`` returns (a wall time), and the CPU-seconds of the child processes it waited for."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = run()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def _inflate(blob: Path) -> list[str]:
    """ISA-L's inflate, as imagegw uses it: 1.7x as fast as pigz (zlib) on the torch layer here."""
    return [str(VENV_BIN / "python"), "-m", "isal.igzip", "-d", "-c", str(blob)]


def _decompress_parallel(blobs: list[Path]) -> float:
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=CPUS) as pool:
        # largest first, so the two cores finish together as far as the sizes allow
        list(pool.map(lambda blob: _drop_output(_inflate(blob)),
                      sorted(blobs, key=lambda b: -b.stat().st_size)))
    return time.monotonic() - started


def _compress(tree_tar: Path, output: Path, compressor: Compressor) -> float:
    """tar2sqfs as imagegw runs it (same compressor, block size, jobs and options), from a file."""
    with tree_tar.open("rb") as source:
        started = time.monotonic()
        subprocess.run(["tar2sqfs", *compressor.tar2sqfs_flags(), "--block-size", str(BLOCK_SIZE),
                        "--num-jobs", str(CPUS), "--defaults", "uid=0,gid=0,mode=0755", "--no-xattr",
                        "--no-skip", "--force", "--quiet", str(output)], stdin=source, check=True,
                       stdout=subprocess.DEVNULL)
        return time.monotonic() - started


def page_in(paths: list[Path]) -> None:
    for path in paths:
        _drop_output(["cat", str(path)])


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


