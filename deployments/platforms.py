"""One Prefect deployment of the pull flow per platform, so each cluster's pulls can be
watched, started and limited on its own in the Prefect UI.

``imagegw worker`` serves them (``imagegw serve`` starts one such worker).
"""

from __future__ import annotations

from collections.abc import Collection

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from flows.pull import pull_image
from imagegw.config import Settings

RUNS_PER_PLATFORM = 2
"""Concurrent pulls per platform: each converts on both of a small gateway host's cores."""


def platform_deployments(settings: Settings, platforms: Collection[str] = ()) -> list[RunnerDeployment]:
    """A ``pull-image/<platform>`` deployment for each of ``platforms`` (default: every configured one)."""
    names = platforms or list(settings.platforms)
    return [
        pull_image.to_deployment(
            name=name,
            parameters={"platform": name, "config": str(settings.source)},
            tags=[f"platform:{name}"],
            concurrency_limit=RUNS_PER_PLATFORM,
            description=f"Pull an image and publish it into {settings.platform(name).image_location}",
        )
        for name in names
    ]


def serve_platforms(settings: Settings, platforms: Collection[str] = ()) -> None:
    """Run the deployments of ``platforms`` in this process until SIGINT or SIGTERM."""
    deployments = platform_deployments(settings, platforms)
    # Not paused on shutdown: a paused deployment keeps its schedules stopped on the server until
    # someone resumes it, while a restarted worker (or one on another host) should find it as it was.
    serve(*deployments, pause_on_shutdown=False, limit=RUNS_PER_PLATFORM * len(deployments))
