"""What a user waits for around a conversion: pulls through ``imagegw serve``, and ``imagegw pull``.

``.venv/bin/python bench/pulls.py [--small-mb 30] [--medium-mb 250] [--large-mb 800] [--repeat 2]
[--sequential N] [--no-cli]`` starts a registry, a munged and ``imagegw serve`` on loopback (bench/lookups.py's
helpers), pulls a warm-up image, then for each size pushes a new image (files of 1 MB, half random, so the
squashfs is about half the tree), lets the machine settle (its writes flushed, then 2 s) and measures:

* through the gateway: POST ``/api/pull`` with a fresh MUNGE credential, then again every 0.1 s until READY;
  POST to READY, and from Prefect's record of the run (the pull record's ``flow_run_id``) the first POST to the
  run's start, created to started, and the run's own run time;
* for the large image, the domain code alone converting the same image (resolve, download into a fresh layer
  cache, flatten, tar2sqfs, publish: what the pull flow's stages call, without Prefect), and the ratio;
* ``--sequential N``: N pulls of distinct small images one after another; the worker's RSS and peak RSS
  (VmHWM) after the 5th and the Nth, and the peak RSS of the worker with the runs it started;
* ``imagegw pull`` of a small image (unless ``--no-cli``): on a fresh state directory with nothing running,
  again on that state directory, and with serve running (which it finds through the state directory).

The load average is printed with each table: the machine's other work moves the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import requests  # noqa: E402 (after the sys.path line)

from bench.lookups import PLATFORM, request, start_serve, write_config  # noqa: E402
from bench.measure import tree_rss  # noqa: E402
from cli.localprefect import served_prefect_api  # noqa: E402
from imagegw.build import LayerSource, build_squashfs_streamed, prepare_layer, streamed_build  # noqa: E402
from imagegw.config import Settings, load_settings  # noqa: E402
from imagegw.plan import plan_pull, pull_key  # noqa: E402
from imagegw.processes import descendants, free_port  # noqa: E402
from imagegw.publish import LocalPublisher, image_meta  # noqa: E402
from imagegw.registry import LayerCache, RegistryClient, fetch_layers  # noqa: E402
from imagegw.store import open_store  # noqa: E402
from testsupport.images import LayerBuilder, push_image  # noqa: E402
from testsupport.munge import RunningMunged  # noqa: E402
from testsupport.registry import RunningRegistry  # noqa: E402

POLL_SECONDS = 0.1
PULL_TIMEOUT = 600.0
SIZES = ("small", "medium", "large")
SETTLE_SECONDS = 2.0
"""Before each timed conversion: the previous one's writes flushed, then this long for the processes it kept busy
(the Prefect server recording its runs' last events and logs, the registry) to go idle."""


@dataclass(frozen=True)
class GatewayPull:
    squashfs_mb: float
    request_to_ready: float
    request_to_started: float
    """From the first POST to the flow run's start (RUNNING) as Prefect recorded it, on the same clock."""
    created_to_started: float
    run_time: float
    """The flow run's own time, start to end, as Prefect recorded it."""


@dataclass
class Gateway:
    """A running ``imagegw serve`` and what the benchmark reaches it with."""

    settings: Settings
    registry: RunningRegistry
    munged: RunningMunged
    api: str
    prefect_api: str
    serve_pid: int
    pushed: int = 0

    def push(self, megabytes: int) -> str:
        """A new image of ``megabytes`` of files, sharing no layer with an earlier one; its full name."""
        self.pushed += 1
        return push_sized_image(self.registry, f"bench/pulls{self.pushed}:1", megabytes)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small-mb", type=int, default=30, help="tree of the small image, MB (default: 30, "
                                                                 "a ~15 MB squashfs)")
    parser.add_argument("--medium-mb", type=int, default=250, help="tree of the medium image, MB (default: 250)")
    parser.add_argument("--large-mb", type=int, default=800, help="tree of the large image, MB (default: 800)")
    parser.add_argument("--repeat", type=int, default=2, help="pulls of each size, each of a new image (default: 2)")
    parser.add_argument("--sequential", type=int, default=0, metavar="N",
                        help="then N pulls of distinct small images one after another, for the worker's memory")
    parser.add_argument("--no-cli", action="store_true", help="skip the `imagegw pull` timings")
    parser.add_argument("--workdir", default=None, help="where everything lives (default: a temporary directory)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="imagegw-pulls-"))
    workdir.mkdir(parents=True, exist_ok=True)
    registry = RunningRegistry.start(workdir / "registry")
    munged = RunningMunged.start(workdir / "munged")
    try:
        if not args.no_cli:
            # Before serve starts: nothing of the gateway runs, as on a newcomer's host.
            cli_fresh = [cli_pull(workdir / f"cli-{round_}", registry, munged, args.small_mb, runs=2)
                         for round_ in range(args.repeat)]
        with serving(workdir, registry, munged) as gateway:
            pulls = gateway_sizes(gateway, args)
            print(sizes_table(pulls, args), flush=True)
            if not args.no_cli:
                print(cli_table(cli_fresh, [cli_pull_with(gateway, args.small_mb) for _ in range(args.repeat)]),
                      flush=True)
            if args.sequential:
                print(sequential(gateway, args.sequential, args.small_mb), flush=True)
        return 0
    finally:
        munged.stop()
        registry.stop()


@contextmanager
def serving(workdir: Path, registry: RunningRegistry, munged: RunningMunged) -> Iterator[Gateway]:
    """``imagegw serve`` (bench/lookups.py's), ready, with a warm-up pull done."""
    config = write_config(workdir, registry, munged)
    api_port = free_port()
    serve = start_serve(workdir, config, api_port)
    try:
        settings = load_settings(config)
        prefect_api = served_prefect_api(settings)
        if prefect_api is None:
            raise RuntimeError(f"imagegw serve named no Prefect server under {settings.state_dir}")
        gateway = Gateway(settings, registry, munged, f"127.0.0.1:{api_port}", prefect_api, serve.pid)
        pull_through(gateway, gateway.push(4))  # the first run of a worker pays its imports and caches
        yield gateway
    finally:
        serve.send_signal(2)  # SIGINT, as Ctrl-C
        serve.wait(60)


def push_sized_image(registry: RunningRegistry, name: str, megabytes: int, layers: int = 4) -> str:
    """Layers of 1 MB files, half random and half text (the compressor's work), unique to this image."""
    built = []
    per_layer = max(1, megabytes // layers)
    for number in range(layers):
        layer = LayerBuilder()
        for index in range(per_layer):
            layer.file(f"data/{number}/{index}.bin", os.urandom(1 << 19) + b"pull bench " * 47663)
        built.append(layer)
    repository, tag = name.split(":")
    push_image(registry, repository, tag, built, compression="none")
    return f"{registry.host}/{name}"


# --------------------------------------------------------------------------- through the gateway


def pull_through(gateway: Gateway, image: str) -> GatewayPull:
    """POST the pull with a fresh credential, re-POST every 0.1 s until READY; Prefect's times of its run."""
    path = f"/api/pull/{PLATFORM}/docker/{image}/"
    credential = gateway.munged.mint()
    requested_at = time.time()
    started = time.monotonic()
    while True:
        record = request(gateway.api, "POST", path, credential)[1]
        if record.get("status") == "READY":
            break
        if record.get("status") == "FAILURE" or time.monotonic() - started > PULL_TIMEOUT:
            raise RuntimeError(f"the pull of {image} ended {record.get('status')}: {record.get('status_message')}")
        time.sleep(POLL_SECONDS)
        credential = gateway.munged.mint()  # munged refuses a replayed credential
    waited = time.monotonic() - started
    pulled = open_store(gateway.settings).pull_record(pull_key(PLATFORM, image)) or {}
    run = finished_run(gateway.prefect_api, pulled["flow_run_id"])
    squashfs = gateway.settings.platform(PLATFORM).image_dir / f"{record['id']}.squashfs"
    return GatewayPull(squashfs.stat().st_size / 1e6, waited,
                       datetime.fromisoformat(run["start_time"]).timestamp() - requested_at,
                       _seconds(run["created"], run["start_time"]),
                       _seconds(run["start_time"], run["end_time"]))


def finished_run(prefect_api: str, flow_run_id: str) -> dict[str, Any]:
    """Prefect's record of a flow run once it has ended: the image is READY a moment before (the run's report)."""
    deadline = time.monotonic() + 60
    while True:
        run: dict[str, Any] = requests.get(f"{prefect_api}/flow_runs/{flow_run_id}", timeout=30).json()
        if run.get("end_time") or time.monotonic() > deadline:
            return run
        time.sleep(POLL_SECONDS)


def _seconds(since: str, until: str) -> float:
    return (datetime.fromisoformat(until) - datetime.fromisoformat(since)).total_seconds()


def gateway_sizes(gateway: Gateway, args: argparse.Namespace) -> dict[str, list[GatewayPull | float]]:
    """Each size ``--repeat`` times, each a new image; the large one also converted by the domain code alone,
    before and after the gateway's pull in alternate rounds."""
    megabytes = {"small": args.small_mb, "medium": args.medium_mb, "large": args.large_mb}
    results: dict[str, list[GatewayPull | float]] = {size: [] for size in (*SIZES, "domain alone")}
    for round_ in range(args.repeat):
        for size in SIZES:
            image = gateway.push(megabytes[size])
            alone_first = size == "large" and round_ % 2 == 1
            if alone_first:
                settle()
                results["domain alone"].append(domain_alone(gateway.settings, image))
            settle()
            results[size].append(pull_through(gateway, image))
            if size == "large" and not alone_first:
                settle()
                results["domain alone"].append(domain_alone(gateway.settings, image))
    return results


def settle() -> None:
    """Let what ran before a timed conversion finish its work: the push of its image, the conversion before it
    (hundreds of MB of dirty pages being written back, on the disk and the two cores the next one uses)."""
    os.sync()
    time.sleep(SETTLE_SECONDS)


def domain_alone(settings: Settings, image: str) -> float:
    """Seconds the pull flow's domain calls take without Prefect: resolve, download into a fresh layer cache
    while flattening and compressing, publish into a directory of its own (the index write left out)."""
    job = plan_pull(settings, pull_key(PLATFORM, image))
    target = settings.platform(PLATFORM)
    with tempfile.TemporaryDirectory(dir=settings.state_dir, prefix="domain-alone-") as scratch_name:
        scratch = Path(scratch_name)
        cache = LayerCache(scratch / "cache")
        started = time.monotonic()
        with RegistryClient(job.ref.location, credential=job.credential, config_cache=cache.config_dir,
                            limits=settings.limits, timeout=settings.registry_timeout) as client:
            manifest = client.resolve(job.ref, job.wanted_platform)
            digests = [layer.digest for layer in manifest.layers]
            with cache.holding(digests), streamed_build(digests, settings.limits) as build, \
                    ThreadPoolExecutor(2) as stages:
                pulling = stages.submit(fetch_layers, client, manifest, cache, arrivals=build.arrivals,
                                        prepare=lambda layer, path: prepare_layer(LayerSource(path, layer.digest),
                                                                                  settings.limits))
                pulling.add_done_callback(build.downloads_ended)
                squashing = stages.submit(build_squashfs_streamed, build.stream, scratch / "image.squashfs",
                                          target.compression, target.block_size)
                build.write_image()
                pulling.result()
                squashfs = squashing.result()
        LocalPublisher(scratch / "images").publish(squashfs.path, image_meta(manifest, job.access),
                                                   manifest.image_id)
        return time.monotonic() - started


def sizes_table(pulls: dict[str, list[GatewayPull | float]], args: argparse.Namespace) -> str:
    lines = [f"Through imagegw serve (after a warm-up pull; load average {_load()})", "",
             "| image | squashfs MB | POST to READY s | POST to run started s | run created to started s "
             "| run's own time s |",
             "|---|---|---|---|---|---|"]
    for size in SIZES:
        runs = [pull for pull in pulls[size] if isinstance(pull, GatewayPull)]
        lines.append(f"| {size} | {runs[0].squashfs_mb:.0f} | {_each(r.request_to_ready for r in runs)} | "
                     f"{_each(r.request_to_started for r in runs)} | {_each(r.created_to_started for r in runs)} | "
                     f"{_each(r.run_time for r in runs)} |")
    alone = [float(value) for value in pulls["domain alone"] if isinstance(value, float)]
    large = [pull.request_to_ready for pull in pulls["large"] if isinstance(pull, GatewayPull)]
    lines += ["", f"Large image ({args.large_mb} MB tree), domain code alone: {_each(alone)} s; through the gateway "
                  f"/ alone: {_each(g / a for g, a in zip(large, alone))} (target <= 1.15)"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the worker's memory


def sequential(gateway: Gateway, count: int, megabytes: int) -> str:
    """``count`` pulls of new small images one after another; the worker's memory after the 5th and the last."""
    worker = next(pid for pid in descendants(gateway.serve_pid)
                  if b"cli\0worker" in Path(f"/proc/{pid}/cmdline").read_bytes())
    rows = []
    for number in range(1, count + 1):
        image = gateway.push(megabytes)
        with _peak_tree_rss(worker) as peak:
            pulled = pull_through(gateway, image)
        status = _status_kb(worker)
        rows.append((number, pulled.request_to_ready, status["VmRSS"], status["VmHWM"], peak[0]))
    lines = [f"{count} pulls of {megabytes} MB images one after another (load average {_load()})", "",
             "| after pull | POST to READY s | worker RSS MB | worker peak RSS (VmHWM) MB | "
             "peak RSS of the worker and its runs during the pull MB |", "|---|---|---|---|---|"]
    for number, waited, rss, hwm, tree in rows:
        if number in (1, 5, 10, 25, 50, count) or number % 100 == 0:
            lines.append(f"| {number} | {waited:.2f} | {rss / 1024:.0f} | {hwm / 1024:.0f} | {tree / 1e6:.0f} |")
    if count >= 5:
        fifth, last = rows[4], rows[-1]
        lines += ["", f"worker RSS after {count} / after 5: {last[2] / fifth[2]:.2f}; peak (VmHWM): "
                      f"{last[3] / fifth[3]:.2f}; peak with its runs, last 5 pulls / first 5: "
                      f"{max(r[4] for r in rows[-5:]) / max(r[4] for r in rows[:5]):.2f} (target <= 1.10)"]
    return "\n".join(lines)


@contextmanager
def _peak_tree_rss(pid: int) -> Iterator[list[int]]:
    """The largest RSS of ``pid`` with its descendants (the runs it starts), sampled every 50 ms in the block."""
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            try:
                peak[0] = max(peak[0], tree_rss(pid))
            except (OSError, ValueError, IndexError):  # a process of the tree ended while being read
                pass

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()


def _status_kb(pid: int) -> dict[str, int]:
    fields = (line.split() for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {parts[0].rstrip(":"): int(parts[1]) for parts in fields if len(parts) == 3 and parts[2] == "kB"}


# --------------------------------------------------------------------------- imagegw pull


def cli_pull(root: Path, registry: RunningRegistry, munged: RunningMunged, megabytes: int, runs: int) -> list[float]:
    """Seconds of ``imagegw pull`` of new images, with nothing of the gateway running: the first on a fresh
    state directory, the others on the one it made."""
    root.mkdir(parents=True, exist_ok=True)
    config = write_config(root, registry, munged)
    return [_timed_cli(push_sized_image(registry, f"bench/cli-{root.name}-{run}:1", megabytes), config)
            for run in range(runs)]


def cli_pull_with(gateway: Gateway, megabytes: int) -> float:
    """Seconds of ``imagegw pull`` of a new image on the state directory of the running serve."""
    return _timed_cli(gateway.push(megabytes), gateway.settings.source)


def _timed_cli(image: str, config: Path | None) -> float:
    # As a user runs it: no Prefect or gateway variables, the configuration on the command line.
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "IMAGEGW_"))}
    started = time.monotonic()
    # `python -m cli` is the installed command's entry point, from this checkout (as serve runs its parts).
    done = subprocess.run([sys.executable, "-m", "cli", "pull", image, "--platform", PLATFORM, "--config",
                           str(config)], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=PULL_TIMEOUT)
    seconds = time.monotonic() - started
    if done.returncode != 0 or json.loads(done.stdout).get("status") != "READY":
        raise RuntimeError(f"imagegw pull {image} failed:\n{done.stderr}")
    return seconds


def cli_table(fresh: list[list[float]], with_serve: list[float]) -> str:
    return "\n".join([
        f"imagegw pull of a small image (load average {_load()})", "",
        "| where | seconds |", "|---|---|",
        f"| fresh state directory, nothing running | {_each(runs[0] for runs in fresh)} |",
        f"| state directory already made, nothing running | {_each(t for runs in fresh for t in runs[1:])} |",
        f"| imagegw serve running (its Prefect server found through the state directory) | {_each(with_serve)} |"])


def _each(values: Iterator[float] | list[float]) -> str:
    return " / ".join(f"{value:.2f}" for value in values)


def _load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
