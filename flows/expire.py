"""The scheduled expire flow: one deployment per platform, on the ``ExpireSchedule`` cron schedule."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows import EXPIRE_FLOW
from imagegw.config import load_settings
from imagegw.store import open_store
from tasks.expire import expire
from tasks.housekeeping import sweep_cache


@flow(name=EXPIRE_FLOW, flow_run_name="expire {platform}")
def expire_images(platform: str, config: str | None = None) -> dict[str, Any]:
    """Remove the images of a platform that nobody pulled or looked up within ImageExpirationTimeout, then
    bring the layer cache under CacheSizeLimit and remove what dead pulls left behind."""
    settings = load_settings(config)
    report = expire(open_store(settings), settings.platform(platform), settings.pull_update_timeout)
    # The cache and the scratch space are the host's, shared by every platform, so each platform's run
    # sweeps them all: harmless, as eviction and removal take the same locks a pull does and redo nothing.
    sweep = sweep_cache(settings, platform)
    return {"expired": [image.id for image in report.expired], "bytes_freed": report.bytes_freed,
            "failures_cleared": report.failures_cleared,
            "layers_evicted": sweep.eviction.evicted, "layer_bytes_evicted": sweep.eviction.bytes_evicted,
            "leftovers_removed": sweep.leftovers.removed, "leftover_bytes_removed": sweep.leftovers.bytes_removed}
