"""The housekeeping stage: the layer cache brought under its cap, and dead pulls' leftovers removed."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from imagegw.config import Settings
from imagegw.housekeeping import Eviction, Leftovers, evict_layers, remove_leftovers
from imagegw.registry import LayerCache


@dataclass(frozen=True)
class Sweep:
    """What one housekeeping pass did."""

    eviction: Eviction
    leftovers: Leftovers


@task(name="sweep-cache", cache_policy=NONE)
def sweep_cache(settings: Settings, platform: str) -> Sweep:
    """Evict the least recently used layers over CacheSizeLimit and remove dead pulls' leftovers; leave a table."""
    cache = LayerCache(settings.cache_dir)
    sweep = Sweep(evict_layers(cache, settings.cache_size_limit), remove_leftovers(cache, settings.expand_dir))
    eviction, leftovers = sweep.eviction, sweep.leftovers
    create_table_artifact(
        key=f"sweep-cache-{platform.lower()}",
        table=[
            {"what": "layers evicted", "count": eviction.evicted, "MB": round(eviction.bytes_evicted / 1e6, 1)},
            {"what": "layers kept: held by running pulls", "count": len(eviction.held), "MB": ""},
            {"what": "leftovers of dead pulls removed", "count": leftovers.removed,
             "MB": round(leftovers.bytes_removed / 1e6, 1)},
        ],
        description=f"Layer cache {settings.cache_dir}: {eviction.bytes_cached / 1e6:.1f} MB cached, "
                    f"cap {eviction.cap / 1e6:.1f} MB (CacheSizeLimit {settings.cache_size_limit})",
    )
    get_run_logger().info(
        "layer cache: %d layers evicted (%.1f MB), %d kept for running pulls, %.1f MB cached of %.1f MB allowed; "
        "%d leftovers of dead pulls removed (%.1f MB)",
        eviction.evicted, eviction.bytes_evicted / 1e6, len(eviction.held), eviction.bytes_cached / 1e6,
        eviction.cap / 1e6, leftovers.removed, leftovers.bytes_removed / 1e6)
    return sweep
