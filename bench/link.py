"""A slower network for the benchmark: a token-bucket limit on the loopback interface.

The registry runs on 127.0.0.1, where downloads are as fast as the CPU. Real registries sit
behind a network, where a streaming pipeline can compress while layers download; ``tc`` (as
root) limits every loopback flow to one rate while the runs take place.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

_RATE = re.compile(r"(\d+(?:\.\d+)?)([kmg]?)bit")
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}


def bits_per_second(rate: str) -> float:
    """``tc``'s rate syntax (``500mbit``, ``1gbit``) in bits per second; ValueError if it is not that."""
    match = _RATE.fullmatch(rate)
    if not match:
        raise ValueError(f"rate {rate!r} is not like 500mbit or 1gbit")
    return float(match.group(1)) * _UNITS[match.group(2)]


@contextmanager
def loopback_limited(rate: str | None) -> Iterator[None]:
    """Loopback traffic limited to ``rate`` inside the block (nothing changes for None)."""
    if rate is None:
        yield
        return
    # A 256 KiB bucket holds a few 64 KiB loopback packets: the link never bursts much above the rate.
    subprocess.run(["tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", rate, "burst", "256kb",
                    "latency", "100ms"], check=True)
    try:
        yield
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False)
