"""The pull stage: resolve the manifest, then fetch the layers into the shared cache."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from imagegw.build.arrivals import LayerArrivals
from imagegw.store.mongo import open_index
from imagegw.build.flatten import LayerSource, prepare_layer
from imagegw.store.records import Status
from imagegw.plan import PullJob
from imagegw.registry.layercache import LayerCache, fetch_layers
from imagegw.registry.progress import DownloadProgress
from imagegw.registry.client import RegistryClient, ResolvedImage
from tasks.retry import transient_failure


@task(name="resolve", retries=2, retry_delay_seconds=[2, 8], retry_condition_fn=transient_failure,
      cache_policy=NONE)
def resolve(job: PullJob) -> ResolvedImage:
    """Fetch the manifest (choosing the platform's image from an index) and the image config."""
    open_index(job.settings).set_stage(job.key, Status.PULLING, f"Getting manifest of {job.ref}")
    client = RegistryClient(job.ref.location, config_cache=LayerCache(job.settings.cache_dir).config_dir)
    try:
        image = client.resolve(job.ref, job.wanted_platform)
    finally:
        client.close()
    get_run_logger().info("%s is %s (%d layers)", job.ref, image.manifest_digest, len(image.layers))
    return image


@task(name="pull", retries=2, retry_delay_seconds=[2, 8], retry_condition_fn=transient_failure,
      cache_policy=NONE)
def pull(job: PullJob, image: ResolvedImage, arrivals: LayerArrivals) -> list[Path]:
    """Download the layers not yet in the cache, verified against their digests, and read their tar headers.

    ``arrivals`` hears of each layer's bytes as they are written, for the unpack stage.
    """
    index = open_index(job.settings)
    cache = LayerCache(job.settings.cache_dir)
    cached = sum(1 for layer in image.layers if cache.has(layer.digest))
    index.set_stage(job.key, Status.PULLING, f"Pulling {len(image.layers)} layers ({cached} cached)")
    progress = DownloadProgress(image.layers, lambda message: index.set_stage(job.key, Status.PULLING, message))
    client = RegistryClient(job.ref.location)
    try:
        paths = fetch_layers(client, image, cache, progress=progress,
                             prepare=lambda layer, path: prepare_layer(LayerSource(path, layer.digest)),
                             arrivals=arrivals)
    finally:
        client.close()
    # Unpack and squash have been at work on the layers as they came; what is left is theirs.
    index.set_stage(job.key, Status.CONVERSION, f"All layers in; finishing the squashfs ({job.platform.compression})")
    get_run_logger().info("layers ready: %d fetched, %d from the cache", len(image.layers) - cached, cached)
    return paths
