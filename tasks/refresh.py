"""The refresh stage: compare each tag in use or watched with its registry, start pulls of those that moved."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from deployments.launcher import DeploymentLauncher
from imagegw.config import Platform, Settings
from imagegw.refresh import Outcome, RefreshReport, refresh_platform
from imagegw.store import open_store
from imagegw.store.watchlist import open_watch_list


# Not retried as a whole: each tag's failure is reported in the table, and the next scheduled run retries it.
@task(name="refresh", cache_policy=NONE)
def refresh(settings: Settings, platform: Platform) -> RefreshReport:
    """Refresh the platform's tags; leave a table of what became of each (the watch list's entries included)."""
    report = refresh_platform(settings, platform, open_store(settings), open_watch_list(settings),
                              DeploymentLauncher(settings))
    create_table_artifact(
        key=f"refresh-{platform.name.lower()}",
        table=[{"image": tag.image, "outcome": tag.outcome.value, "detail": tag.detail} for tag in report.tags]
        or [{"image": "(no tag in use or watched)", "outcome": "", "detail": ""}],
        description=f"Refresh of {platform.name}: {report.count(Outcome.PULL_STARTED)} pulls started, "
                    f"{report.count(Outcome.UNCHANGED)} tags unchanged, {report.count(Outcome.FAILED)} failed",
    )
    logger = get_run_logger()
    for tag in report.tags:
        log = logger.warning if tag.outcome is Outcome.FAILED else logger.info
        log("%s: %s%s", tag.image, tag.outcome.value, f" ({tag.detail})" if tag.detail else "")
    return report
