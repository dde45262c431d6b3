"""Publishing over SSH on loopback: ``RemotePublisher`` against ``scp``, and what failing over costs.

    .venv/bin/python bench/transfer.py [--size-mb 400] [--file PATH] [--repeat 3]

Starts one private sshd (``testsupport/sshd.py``) and stops it at the end. (1) Copies a file (by
default a fresh one of --size-mb MB of random bytes, incompressible like a squashfs) into a
directory through that sshd with ``RemotePublisher.publish``, with its pipelined SFTP write alone,
with ``scp``, and with ``scp`` then a remote ``openssl dgst -sha256`` (the publisher's verification);
the methods alternate their order over --repeat rounds. (2) Times ``is_published()`` on a fresh
publisher whose first host is the sshd, down, not SSH, or silent. Prints Markdown tables and
writes them to ``.state/bench/transfer.md``. MB are 10^6 bytes.

A real squashfs to copy: ``bench/run --sizes large --repeat 1 --keep`` leaves the large image's at
``.state/bench/runs/large-b-0/images-cold/<id>.squashfs`` (until the next ``bench/run``).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.images import log  # noqa: E402 (after the sys.path line)
from bench.pipelines import page_in  # noqa: E402
from imagegw.publish.remote import RemotePublisher  # noqa: E402
from imagegw.sshconfig import RemoteAccess, SshHost  # noqa: E402
from testsupport.sshd import SshServer, dead_address, refusing_listener  # noqa: E402

MB = 1_000_000
CONNECT_TIMEOUT = 2.0
"""``RemoteAccess.connect_timeout`` of every publisher here: what a silent first host costs."""
REPORT = ROOT / ".state" / "bench" / "transfer.md"
META = '{"bench": true}\n'


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/transfer.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=400, help="size of the random file to copy (default: 400)")
    parser.add_argument("--file", type=Path, help="copy this file instead, e.g. a squashfs kept by bench/run --keep")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each measurement (default: 3)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.size_mb < 1:
        parser.error("--repeat and --size-mb must be at least 1")
    if args.file is not None and not args.file.is_file():
        parser.error(f"{args.file} is not a file")
    return args


def host(address: str) -> SshHost:
    name, _, port = address.rpartition(":")
    return SshHost(name, int(port))


class Bench:
    """The sshd, the file to copy and the directory it is copied into (on this machine, through the sshd)."""

    def __init__(self, server: SshServer, source: Path, target_dir: Path) -> None:
        self.server = server
        self.source = source
        self.target_dir = target_dir
        self.options = ["-q", "-i", str(server.keys.ed25519), "-o", f"UserKnownHostsFile={server.known_hosts}",
                        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]

    def publisher(self, *first: str) -> RemotePublisher:
        access = RemoteAccess(hosts=tuple(host(address) for address in (*first, self.server.address)),
                              username=self.server.user, key=self.server.keys.ed25519,
                              known_hosts=self.server.known_hosts, connect_timeout=CONNECT_TIMEOUT)
        return RemotePublisher(access, self.target_dir)

    def clean(self) -> None:
        """Remove what a run copied and write back what else is dirty, so that no run pays for the last one."""
        for path in self.target_dir.iterdir():
            path.unlink()
        os.sync()

    # -- the copies, each timed from start to answer --------------------------------------------------

    def publish(self) -> float:
        started = time.monotonic()
        with self.publisher() as publisher:
            publisher.publish(self.source, META, "bench")
        return time.monotonic() - started

    def sftp_write(self) -> float:
        """remote.py's own pipelined write (its window, request size, cipher; with the local SHA-256 it
        computes as it sends) on a connection already open: the copy without connecting or verifying."""
        with self.publisher() as publisher, open(self.source, "rb") as source:
            sftp = publisher._connect().sftp  # noqa: SLF001 - the bench times the private step alone
            started = time.monotonic()
            RemotePublisher._write(sftp, source, str(self.target_dir / "bench.squashfs"))  # noqa: SLF001
            return time.monotonic() - started

    def scp(self, verify: bool = False) -> float:
        target = self.target_dir / "bench.squashfs"
        started = time.monotonic()
        subprocess.run(["scp", *self.options, "-P", str(self.server.port), str(self.source),
                        f"{self.server.user}@{self.server.host}:{target}"], check=True)
        if verify:
            subprocess.run(["ssh", *self.options, "-p", str(self.server.port), f"{self.server.user}@{self.server.host}",
                            f"openssl dgst -sha256 -r {shlex.quote(str(target))}"],
                           check=True, stdout=subprocess.DEVNULL)
        return time.monotonic() - started

    def scp_verified(self) -> float:
        return self.scp(verify=True)

    def exec_true(self) -> float:
        """One exec channel running ``true``, as the publisher runs ``openssl dgst`` once per file: the cost
        of the remote account's shell starting (its ``~/.bashrc`` included: sshd's bash reads it)."""
        with self.publisher() as publisher:
            publisher.is_published("absent")  # connected
            started = time.monotonic()
            publisher._run("true")  # noqa: SLF001
            return time.monotonic() - started

    def is_published(self, *first: str) -> float:
        """Seconds from ``is_published()`` on a fresh publisher to its answer (connecting included)."""
        with self.publisher(*first) as publisher:
            started = time.monotonic()
            publisher.is_published("absent")
            elapsed = time.monotonic() - started
            if not str(publisher).startswith(self.server.address):
                raise RuntimeError(f"{publisher} answered, not the sshd at {self.server.address}")
        return elapsed


@contextmanager
def silent_host() -> Iterator[str]:
    """``127.0.0.1:PORT`` where TCP connections are accepted (by the kernel, into a listening socket that is
    never read) but no SSH banner ever comes: a host that hangs."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as listener:
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as out:
        for offset in range(0, size, 1 << 20):
            out.write(os.urandom(min(1 << 20, size - offset)))


def local_sha256(path: Path) -> float:
    """Seconds to hash the file here as remote.py's write does, chunk by chunk in the same thread."""
    started = time.monotonic()
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return time.monotonic() - started


def median_row(label: str, times: list[float], extra: str, digits: int = 2) -> str:
    runs = ", ".join(f"{seconds:.{digits}f}" for seconds in times)
    return f"| {label} | {statistics.median(times):.{digits}f} | {extra} | {runs} |"


def run(args: argparse.Namespace, workdir: Path) -> str:
    if args.file is not None:
        source = args.file.resolve()
    else:
        source = workdir / "random.bin"
        log(f"writing {args.size_mb} MB of random bytes to {source}")
        write_random(source, args.size_mb * MB)
    size = source.stat().st_size
    page_in([source])  # every method reads it from memory, the first one too
    target_dir = workdir / "images"
    target_dir.mkdir()
    log("starting sshd")
    with SshServer.start(workdir / "ssh") as server:
        bench = Bench(server, source, target_dir)
        copies: dict[str, Callable[[], float]] = {
            "`RemotePublisher.publish` (connect, write, verify, rename, `.meta`)": bench.publish,
            "SFTP write alone (remote.py's, connected, local SHA-256 included)": bench.sftp_write,
            "`scp`": bench.scp,
            "`scp` + `ssh … openssl dgst -sha256`": bench.scp_verified,
        }
        copy_times: dict[str, list[float]] = {label: [] for label in copies}
        for round_ in range(args.repeat):
            for label, copy in list(copies.items())[::1 if round_ % 2 == 0 else -1]:
                bench.clean()
                copy_times[label].append(copy())
                log(f"round {round_ + 1}: {label} {copy_times[label][-1]:.2f} s")
        bench.clean()
        exec_times = [bench.exec_true() for _ in range(args.repeat)]
        hash_times = [local_sha256(source) for _ in range(args.repeat)]
        with ExitStack() as stack:
            cases = {
                "(a) [sshd]": (),
                "(b) [down (connection refused), sshd]": (dead_address(),),
                "(c) [answers, not SSH (closes at once), sshd]": (stack.enter_context(refusing_listener()).address,),
                f"(d) [silent (no banner), sshd], connect timeout {CONNECT_TIMEOUT:g} s":
                    (stack.enter_context(silent_host()),),
            }
            failover_times: dict[str, list[float]] = {label: [] for label in cases}
            for round_ in range(args.repeat):
                for label, first in cases.items():
                    failover_times[label].append(bench.is_published(*first))
                log(f"round {round_ + 1}: failover " + ", ".join(f"{times[-1]:.3f} s" for times in
                                                                   failover_times.values()))
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    lines = [f"Publishing {size / MB:.4g} MB ({source.name}) to a loopback sshd, {time.strftime('%Y-%m-%d')}, "
             f"{os.cpu_count()} cores, median of {args.repeat} (load average at the end: {load})", "",
             "| copy | median s | MB/s | runs (s) |", "|---|---:|---:|---|"]
    lines += [median_row(label, times, f"{size / MB / statistics.median(times):.0f}")
              for label, times in copy_times.items()]
    lines += ["", f"A remote command on the open connection (`true` over an exec channel, as the publisher runs "
              f"`openssl dgst` for the squashfs; the `.meta` is read back): {statistics.median(exec_times):.3f} s "
              f"(runs: {', '.join(f'{seconds:.3f}' for seconds in exec_times)}). The SHA-256 the SFTP write "
              f"computes as it sends, alone: {statistics.median(hash_times):.2f} s."]
    base = statistics.median(failover_times["(a) [sshd]"])
    lines += ["", f"`is_published()` on a fresh publisher (connecting included), RemoteAccess(connect_timeout="
              f"{CONNECT_TIMEOUT:g}), median of {args.repeat}", "",
              "| host list | median s | extra over (a) s | runs (s) |", "|---|---:|---:|---|"]
    lines += [median_row(label, times, f"{statistics.median(times) - base:+.3f}", 3)
              for label, times in failover_times.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # paramiko's transport thread logs each failed banner read with its traceback: cases (c) and (d) fail on purpose.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="transfer-", dir=REPORT.parent) as workdir:
        text = run(args, Path(workdir))
    REPORT.write_text(text)
    print(text)
    log(f"written {REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
