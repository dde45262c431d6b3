"""The image pipeline: pull → unpack → squash → transfer → index."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefect import flow

from imagegw.config import Settings, load_settings
from imagegw.database import open_index
from imagegw.index import PullKey
from imagegw.job import plan_pull, pull_key
from tasks.index import find_published, index
from tasks.pull import pull, resolve
from tasks.squash import squash
from tasks.transfer import transfer
from tasks.unpack import unpack


@flow(name="pull-image", flow_run_name="pull {image} for {platform}")
def pull_image(image: str, platform: str, config: str | None = None) -> dict[str, Any]:
    """Pull an image from its registry and publish it as a squashfs on one platform."""
    settings = load_settings(config)
    job = plan_pull(settings, pull_key(platform, image))
    with failure_recorded(settings, job.key), scratch_directory(settings) as scratch:
        manifest = resolve(job)
        published = find_published(job, manifest)
        if published is None:  # an unchanged digest skips straight to the index
            layers = pull(job, manifest)
            tree = unpack(job, manifest, layers)
            squashfs = squash(job, tree, scratch)
            published = transfer(job, manifest, squashfs)
        return index(job, manifest, published)


@contextmanager
def failure_recorded(settings: Settings, key: PullKey) -> Iterator[None]:
    """Whatever stops the pipeline is written to the pull record as FAILURE, with its message."""
    try:
        yield
    except Exception as exc:
        open_index(settings).fail_pull(key, str(exc) or type(exc).__name__)
        raise


@contextmanager
def scratch_directory(settings: Settings) -> Iterator[Path]:
    """A private working directory under ExpandDirectory, removed however the pull ends."""
    settings.expand_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pull-", dir=settings.expand_dir) as scratch:
        yield Path(scratch)
