"""One Prefect deployment of the pull flow per platform, so each cluster's pulls can be
watched, started and limited on its own in the Prefect UI.

``python -m deployments.platforms --config FILE`` serves them from this process.
"""

from __future__ import annotations

import argparse

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from flows.pull import pull_image
from imagegw.config import Settings, load_settings

RUNS_PER_PLATFORM = 2
"""Concurrent pulls per platform: each converts on both of a small gateway host's cores."""


def platform_deployments(settings: Settings) -> list[RunnerDeployment]:
    """A ``pull-image/<platform>`` deployment for every platform in the configuration."""
    return [
        pull_image.to_deployment(
            name=name,
            parameters={"platform": name, "config": str(settings.source)},
            tags=[f"platform:{name}"],
            concurrency_limit=RUNS_PER_PLATFORM,
            description=f"Pull an image and publish it into {platform.image_dir}",
        )
        for name, platform in settings.platforms.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the per-platform pull deployments.")
    parser.add_argument("--config", "-c", help="imagemanager.json (default: $IMAGEGW_CONFIG)")
    serve(*platform_deployments(load_settings(parser.parse_args().config)))


if __name__ == "__main__":
    main()
