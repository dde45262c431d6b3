"""The lookup load benchmark: many clients looking an image up through ``imagegw serve`` on loopback.

``.venv/bin/python bench/lookups.py [--clients 16] [--seconds 20] [--large-mb 800]`` starts a registry, a
munged and ``imagegw serve`` (its embedded database and Prefect server), pulls a small image, then runs
two rounds of lookups: idle, and while a large image (``--large-mb`` of files, built here) converts.

Each lookup carries a MUNGE credential of its own (munged refuses a replayed one), minted before the
round so that the clients spend their time on requests. Each client is a thread with one keep-alive
connection, by default each in a process of its own, as job starts come from separate nodes: threads
sharing a process wait for its interpreter lock, and that wait was counted as lookup latency (p99 71
ms with 16 clients in 2 processes, 54 ms in 16). Reported per round: lookups per second, p50 and
p99 latency, errors (must be 0), and the peak RSS of every process of the gateway.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from imagegw.processes import descendants, free_port  # noqa: E402 (after the sys.path line)
from imagegw.service.munge import encode_credential  # noqa: E402
from testsupport.images import LayerBuilder, push_image  # noqa: E402
from testsupport.munge import RunningMunged  # noqa: E402
from testsupport.registry import RunningRegistry  # noqa: E402

PLATFORM = "benchcluster"
SMALL = "bench/lookup:1"
LARGE = "bench/large:1"


@dataclass(frozen=True)
class Round:
    name: str
    lookups: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    cpu_seconds: dict[str, float]
    """CPU time each gateway process (and the clients, together) used during the round."""

    @property
    def per_second(self) -> float:
        return self.lookups / self.seconds if self.seconds else 0.0

    def percentile(self, share: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default: 16)")
    parser.add_argument("--processes", type=int, help="client processes sharing them (default: one a client)")
    parser.add_argument("--seconds", type=float, default=20, help="length of the idle round (default: 20)")
    parser.add_argument("--large-mb", type=int, default=800, help="size of the image converting in the second "
                                                                  "round, in MB (0: no second round; default 800)")
    parser.add_argument("--images", type=int, default=500,
                        help="READY images in the index besides the one looked up, as a site's index has them "
                             "(default: 500)")
    parser.add_argument("--api-workers", type=int, default=None,
                        help="the gateway's ApiWorkers (default: the gateway's default)")
    parser.add_argument("--workdir", default=None, help="where everything lives (default: a temporary directory)")
    parser.add_argument("--profile", action="store_true",
                        help="sample the API and database processes with py-spy during the idle round; write "
                             "their folded stacks to the workdir and print where the time goes")
    args = parser.parse_args()
    args.processes = args.processes or args.clients
    return args


def main() -> int:
    args = parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="imagegw-lookups-"))
    workdir.mkdir(parents=True, exist_ok=True)
    registry = RunningRegistry.start(workdir / "registry")
    munged = RunningMunged.start(workdir / "munged")
    serve = None
    try:
        push_image(registry, *SMALL.split(":"), [LayerBuilder().file("hello", b"lookups")])
        config = write_config(workdir, registry, munged, args.api_workers)
        api_port = free_port()
        serve = start_serve(workdir, config, api_port)
        api = f"127.0.0.1:{api_port}"
        image = f"{registry.host}/{SMALL}"
        pull_until_ready(api, image, munged)
        fill_index(config, args.images)
        profiles = start_profiles(serve.pid, workdir, args) if args.profile else []
        rounds = [run_round("idle", api, image, munged, args, lambda started: time.monotonic() - started
                            >= args.seconds, serve.pid)]
        for name, profiler, folded in profiles:
            profiler.wait()
            print(f"\n{name}: {folded}\n{hottest(folded)}")
        if args.large_mb:
            large = f"{registry.host}/{LARGE}"
            push_large_image(registry, args.large_mb)
            rounds.append(run_round("while a large pull converts", api, image, munged, args,
                                    lambda started: pull_status(api, large, munged) in ("READY", "FAILURE"),
                                    serve.pid, begin=lambda: start_pull(api, large, munged)))
        peaks = peak_rss(serve.pid)
        print(report(rounds, peaks, args))
        return 0 if all(round_.errors == 0 for round_ in rounds) else 1
    finally:
        if serve is not None:
            serve.send_signal(signal.SIGINT)
            serve.wait(60)
        munged.stop()
        registry.stop()


def start_profiles(serve: int, workdir: Path, args: argparse.Namespace) -> list[tuple[str, Any, Path]]:
    """py-spy recorders of the API and the database, started now and sampling through most of the idle round
    (the credentials are minted first). Only samples holding the GIL count: CPU, not waiting."""
    profiles = []
    for pid in descendants(serve):
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        # With ApiWorkers above 1 the API's work is done by the processes uvicorn spawns.
        name = ("api" if b" cli api" in command or b"multiprocessing.spawn" in command else
                "database" if b"secantus" in command else None)
        if name is None:
            continue
        name = f"{name}-{pid}"
        folded = workdir / f"{name}.folded"
        profiler = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid),
                                     "--duration", str(int(args.seconds)), "--format", "raw", "--nonblocking",
                                     "--gil",
                                     "--output", str(folded)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        profiles.append((name, profiler, folded))
    return profiles


def hottest(folded: Path, shown: int = 25) -> str:
    """The functions with the most samples on the stack (inclusive), from py-spy's folded stacks."""
    inclusive: dict[str, int] = {}
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        for frame in set(stack.split(";")):
            inclusive[frame] = inclusive.get(frame, 0) + int(count)
    rows = sorted(inclusive.items(), key=lambda item: -item[1])[:shown]
    return "\n".join(f"{100 * count / total:5.1f}%  {frame}" for frame, count in rows)


def fill_index(config: Path, count: int) -> None:
    """Record ``count`` more READY images, through the gateway's own store (their files are not needed)."""
    from imagegw.config import load_settings
    from imagegw.store import ImageFacts, PullKey, open_store

    store = open_store(load_settings(config))
    for number in range(count):
        image_id = f"{number:064x}"
        store.publish(PullKey(PLATFORM, "docker", f"site/app{number}:1"),
                      ImageFacts(id=image_id, manifest_digest=f"sha256:{image_id}", registry="site", repository=
                                 f"app{number}", arch="amd64", os="linux", size=1 << 30, layers=[]))


def write_config(workdir: Path, registry: RunningRegistry, munged: RunningMunged,
                 api_workers: int | None = None) -> Path:
    config = workdir / "imagemanager.json"
    config.write_text(json.dumps({
        "StateDirectory": str(workdir / "state"),
        **({} if api_workers is None else {"ApiWorkers": api_workers}),
        "Locations": {registry.host: {"url": registry.url}},
        "Platforms": {PLATFORM: {"accesstype": "local", "local": {"imageDir": str(workdir / "images")},
                                 "mungeSocketPath": munged.socket_path}},
    }))
    return config


def start_serve(workdir: Path, config: Path, api_port: int) -> subprocess.Popen[bytes]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "IMAGEGW_"))}
    output = workdir / "serve.out"
    with open(output, "wb") as sink:
        serve = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--config", str(config), "--port",
                                  str(api_port), "--prefect-port", str(free_port())],
                                 cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, env=environment)
    deadline = time.monotonic() + 180
    while not any(line.startswith("ready") for line in output.read_text().splitlines()):
        if serve.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"imagegw serve did not start:\n{output.read_text()}")
        time.sleep(0.2)
    return serve


def request(api: str, method: str, path: str, credential: str) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection(api, timeout=30)
    try:
        connection.request(method, path, headers={"authentication": credential})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def start_pull(api: str, image: str, munged: RunningMunged) -> dict[str, Any]:
    return request(api, "POST", f"/api/pull/{PLATFORM}/docker/{image}/", munged.mint())[1]


def pull_status(api: str, image: str, munged: RunningMunged) -> str:
    return str(start_pull(api, image, munged).get("status"))


def pull_until_ready(api: str, image: str, munged: RunningMunged) -> None:
    deadline = time.monotonic() + 300
    while (status := pull_status(api, image, munged)) != "READY":
        if status == "FAILURE" or time.monotonic() > deadline:
            raise RuntimeError(f"the pull of {image} ended {status}")
        time.sleep(0.5)


def push_large_image(registry: RunningRegistry, megabytes: int) -> None:
    """Layers of 1 MB files, half random and half text, so that the squashfs compressor has work."""
    layers = []
    per_layer = max(1, megabytes // 4)
    for number in range(4):
        layer = LayerBuilder()
        for index in range(per_layer):
            layer.file(f"data/{number}/{index}.bin", os.urandom(1 << 19) + b"lookup bench " * 40330)
        layers.append(layer)
    push_image(registry, *LARGE.split(":"), layers, compression="none")


def run_round(name: str, api: str, image: str, munged: RunningMunged, args: argparse.Namespace,
              done: Any, serve_pid: int, begin: Any = None) -> Round:
    """Clients look ``image`` up until ``done(started)``; each lookup spends one fresh credential. ``begin`` is
    called once the credentials are minted, as the clients start (minting takes seconds a pull would use)."""
    # Enough for 1500 lookups/s: the idle round lasts --seconds, the other until the pull ends (a minute at most).
    budget = args.seconds if name == "idle" else 60
    credentials = [encode_credential(b"", munged.socket_path) for _ in range(int(1500 * budget))]
    stop = multiprocessing.Event()
    results: Any = multiprocessing.Queue()
    shares = [credentials[number::args.processes] for number in range(args.processes)]
    path = f"/api/lookup/{PLATFORM}/docker/{image}/"
    threads = max(1, args.clients // args.processes)
    clients = [multiprocessing.Process(target=client_process, args=(api, path, share, threads, stop, results))
               for share in shares]
    if begin is not None:
        begin()
    cpu_before = cpu_times(serve_pid)
    started = time.monotonic()
    for client in clients:
        client.start()
    while not done(started):
        time.sleep(0.2)
    stop.set()
    seconds = time.monotonic() - started
    cpu_after = cpu_times(serve_pid)
    cpu = {name: cpu_after[name] - cpu_before.get(name, 0.0) for name in cpu_after}
    latencies, errors = [], 0
    cpu["clients (all processes)"] = 0.0
    for _ in clients:
        client_latencies, client_errors, client_cpu = results.get()
        latencies += client_latencies
        errors += client_errors
        cpu["clients (all processes)"] += client_cpu
    for client in clients:
        client.join()
    return Round(name, len(latencies), errors, seconds, latencies, cpu)


def client_process(api: str, path: str, credentials: list[str], threads: int, stop: Any, results: Any) -> None:
    shares = [credentials[number::threads] for number in range(threads)]
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client(share: list[str]) -> None:
        connection = LookupConnection(api)
        mine = []
        for credential in share:
            if stop.is_set():
                break
            began = time.perf_counter()
            try:
                ok = connection.get(path, credential) == 200
            except (OSError, ValueError):
                connection.close()
                ok = False
            if ok:
                mine.append((time.perf_counter() - began) * 1000)
            else:
                with lock:
                    errors[0] += 1
        connection.close()
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=client, args=(share,)) for share in shares]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    results.put((latencies, errors[0], time.process_time()))


class LookupConnection:
    """A keep-alive HTTP/1.1 connection that sends GETs and reads each answer's status and body.

    The clients share the gateway's two cores, where on a cluster they are on other nodes, so they do as
    little as an HTTP client can: http.client parsed every answer's headers with the email package, 0.4 ms
    of CPU a lookup, a fifth of what the lookup cost the gateway. The gateway answers with a Content-Length
    (Shifter's C client needs it), and an answer without one is an error here.
    """

    def __init__(self, api: str, timeout: float = 30) -> None:
        host, port = api.rsplit(":", 1)
        self._address = (host, int(port))
        self._host = api.encode()
        self._timeout = timeout
        self._socket: socket.socket | None = None
        self._unread = b""

    def get(self, path: str, credential: str) -> int:
        """GET ``path`` with ``credential`` in the ``authentication`` header; the answer's status."""
        if self._socket is None:
            self._socket = socket.create_connection(self._address, timeout=self._timeout)
            self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socket.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\nauthentication: %s\r\n\r\n"
                             % (path.encode(), self._host, credential.encode()))
        received = self._unread
        while (end := received.find(b"\r\n\r\n")) < 0:
            received += self._receive()
        head, received = received[:end], received[end + 4:]
        length = _content_length(head)
        while len(received) < length:
            received += self._receive()
        self._unread = received[length:]
        return int(head[9:12])

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
        self._socket, self._unread = None, b""

    def _receive(self) -> bytes:
        assert self._socket is not None
        chunk = self._socket.recv(65536)
        if not chunk:
            raise ConnectionError("the gateway closed the connection in the middle of an answer")
        return chunk


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise ValueError(f"an answer without a Content-Length: {head[:200]!r}")


def cpu_times(root: int) -> dict[str, float]:
    """CPU seconds (user and system) used so far by ``root``, each process below it, and munged."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for pid in [root, *descendants(root), *munged_pids()]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[process_name(pid)] = (int(fields[11]) + int(fields[12])) / ticks
    return found


def munged_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and (entry / "comm").exists() and _comm(entry) == "munged"]


def _comm(entry: Path) -> str:
    try:
        return (entry / "comm").read_text().strip()
    except OSError:
        return ""


def process_name(pid: int) -> str:
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return f"{pid} {' '.join(part.decode(errors='replace') for part in command[:4])[:60]}"


def peak_rss(root: int) -> dict[str, int]:
    """Peak RSS (VmHWM, bytes) of ``root`` and every process below it, by a short name."""
    peaks = {}
    for pid in [root, *descendants(root)]:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            name = process_name(pid)
        except OSError:
            continue
        peaks[name] = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")),
                           0)
    return peaks


def report(rounds: list[Round], peaks: dict[str, int], args: argparse.Namespace) -> str:
    lines = [f"{args.clients} clients in {args.processes} processes, one MUNGE credential a lookup; "
             f"{args.images + 1} images in the index", "",
             "| round | lookups | lookups/s | p50 ms | p99 ms | errors |", "|---|---|---|---|---|---|"]
    for round_ in rounds:
        lines.append(f"| {round_.name} | {round_.lookups} | {round_.per_second:.0f} | "
                     f"{statistics.median(round_.latencies_ms) if round_.latencies_ms else float('nan'):.1f} | "
                     f"{round_.percentile(0.99):.1f} | {round_.errors} |")
    lines += ["", "| gateway process | peak RSS MB | " + " | ".join(f"CPU s ({r.name})" for r in rounds) + " |",
              "|---|---|" + "---|" * len(rounds)]
    for name in sorted(set(peaks) | {n for r in rounds for n in r.cpu_seconds}):
        cpu = " | ".join(f"{r.cpu_seconds.get(name, 0.0):.1f}" for r in rounds)
        lines.append(f"| {name} | {peaks.get(name, 0) / 1e6:.0f} | {cpu} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
