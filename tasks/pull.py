"""The pull stage: resolve the manifest, then fetch the layers into the shared cache."""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from imagegw.build import LayerArrivals, LayerSource, prepare_layer
from imagegw.config import Limits
from imagegw.errors import IndexUnavailable
from imagegw.plan import PullPlan
from imagegw.pullreport import PullRecorder
from imagegw.registry import (
    DownloadProgress,
    ImageBytesLimit,
    LayerCache,
    RegistryClient,
    ResolvedImage,
    fetch_layers,
)
from imagegw.store import PullTracker, Status
from tasks.retry import transient_failure


@task(name="resolve", retries=2, retry_delay_seconds=[2, 8], retry_condition_fn=transient_failure,
      cache_policy=NONE)
def resolve(client: RegistryClient, job: PullPlan, tracker: PullTracker, recorder: PullRecorder) -> ResolvedImage:
    """Fetch the manifest (choosing the platform's image from an index) and the image config."""
    tracker.stage(Status.PULLING, f"Getting manifest of {job.ref}")
    with recorder.timing("resolve"):
        image = client.resolve(job.ref, job.wanted_platform)
    get_run_logger().info("%s is %s (%d layers)", job.ref, image.manifest_digest, len(image.layers))
    return image


@task(name="pull", retries=2, retry_delay_seconds=[2, 8], retry_condition_fn=transient_failure,
      cache_policy=NONE)
def pull(client: RegistryClient, image: ResolvedImage, cache: LayerCache, arrivals: LayerArrivals,
         tracker: PullTracker, recorder: PullRecorder, limits: Limits,
         max_bytes: ImageBytesLimit | None) -> list[Path]:
    """Download the layers not yet in the cache, verified against their digests, and read their tar headers.

    ``arrivals`` hears of each layer's bytes as they are written, for the unpack stage; the layers
    together may hold ``max_bytes`` uncompressed, and their tars what ``limits`` allows.
    """
    cached = sum(1 for layer in image.layers if cache.has(layer.digest))
    tracker.stage(Status.PULLING, f"Pulling {len(image.layers)} layers ({cached} cached)")
    progress = DownloadProgress(image.layers, lambda message: _report_progress(tracker, message))
    with recorder.timing("pull"):
        paths = fetch_layers(client, image, cache, progress=progress,
                             prepare=lambda layer, path: prepare_layer(LayerSource(path, layer.digest), limits),
                             arrivals=arrivals, limit=max_bytes)
    recorder.downloaded(fetched=len(image.layers) - cached, cached=cached, received=progress.received)
    # Unpack and squash have been at work on the layers as they came; what is left is theirs.
    tracker.stage(Status.CONVERSION, "All layers in; finishing the squashfs")
    get_run_logger().info("layers ready: %d fetched, %d from the cache", len(image.layers) - cached, cached)
    return paths


def _report_progress(tracker: PullTracker, message: str) -> None:
    """Write a download's progress to the record, if the image index takes it.

    With the index away, a message is dropped (the next carries the whole count), not raised: raising
    would throw away the download, and the record is written when its next stage begins, which a
    task's retries cover.
    """
    with suppress(IndexUnavailable):
        tracker.stage(Status.PULLING, message)
