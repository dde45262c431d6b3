"""The scheduled refresh flow: one deployment per platform, on the ``RefreshSchedule`` cron schedule."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows import REFRESH_FLOW
from imagegw.config import load_settings
from tasks.refresh import refresh


@flow(name=REFRESH_FLOW, flow_run_name="refresh {platform}")
def refresh_images(platform: str, config: str | None = None) -> dict[str, Any]:
    """Pull again every tag in use or on the platform's watch list whose registry digest moved."""
    settings = load_settings(config)
    report = refresh(settings, settings.platform(platform))
    return {"tags": {tag.image: tag.outcome.value for tag in report.tags}}
