"""The image pipeline: pull → unpack → squash → transfer → index."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

from flows import PULL_FLOW
from imagegw.build import SquashResult, streamed_build
from imagegw.config import Limits, Platform, load_settings
from imagegw.disk import scratch_directory
from imagegw.plan import image_bytes_limit, pull_key
from imagegw.processes import run_as_batch_work
from imagegw.publish import publisher_for
from imagegw.pullreport import PullRecorder
from imagegw.registry import ImageBytesLimit, LayerCache, RegistryClient, ResolvedImage
from imagegw.store import PullTracker, open_store
from tasks.index import index, is_ready, plan, settle_access
from tasks.pull import pull, resolve
from tasks.report import report_pull
from tasks.squash import squash
from tasks.transfer import transfer
from tasks.unpack import unpack


# Async, though every stage blocks: Prefect ends a sync flow run by joining a thread that
# sleeps in 1 s steps, a large part of a small pull.
# No result is kept (the record is in the image index). A storage is named all the same: for a flow that names
# none, Prefect asks the server for its default storage three times while the run starts (bench/README.md).
@flow(name=PULL_FLOW, flow_run_name="pull {image} for {platform}", persist_result=False,
      result_storage=PREFECT_LOCAL_STORAGE_PATH.value())
async def pull_image(image: str, platform: str, config: str | None = None,
                     pull_id: str | None = None) -> dict[str, Any]:
    """Pull an image from its registry and publish it as a squashfs on one platform, writing its record as the
    run of the claim ``pull_id`` (the gateway's launcher passes it; without it, the record's claim)."""
    run_as_batch_work()
    settings = load_settings(config)
    target = settings.platform(platform)
    key = pull_key(platform, image)
    store = open_store(settings)
    cache = LayerCache(settings.cache_dir)
    recorder = PullRecorder()
    tracker = PullTracker(store, key, pull_id or store.claim_for_run(key))
    with tracker.running(), scratch_directory(settings.expand_dir, "pull-") as scratch, \
            publisher_for(target) as publisher:
        job = plan(store, settings, key)
        with RegistryClient(job.ref.location, credential=job.credential, config_cache=cache.config_dir,
                            limits=settings.limits, timeout=settings.registry_timeout) as client:
            manifest = resolve(client, job, tracker, recorder)
            access = settle_access(store, job, manifest)
            squashfs = None
            if not is_ready(store, publisher, job, manifest):  # an unchanged digest is not downloaded again
                squashfs = pull_unpack_squash(client, manifest, cache, target, scratch, tracker, recorder,
                                              settings.limits, image_bytes_limit(settings.limits, publisher))
        published = transfer(publisher, manifest, access, squashfs, tracker, recorder)
        record = index(tracker, manifest, published, access, recorder)
    # Outside the tracker: a report that cannot be written does not turn a READY image into a FAILURE.
    report_pull(recorder.report(key.tag, target, manifest, squashfs, published))
    return record


def pull_unpack_squash(client: RegistryClient, manifest: ResolvedImage, cache: LayerCache, target: Platform,
                       scratch: Path, tracker: PullTracker, recorder: PullRecorder, limits: Limits,
                       max_bytes: ImageBytesLimit | None) -> SquashResult:
    """The three stages run side by side, like a shell pipeline: each layer is flattened into
    the tar stream as it downloads, and tar2sqfs compresses the stream as it is written."""
    digests = [layer.digest for layer in manifest.layers]
    squashing = None
    try:
        # Held from before the first download to the last read: eviction cannot take a layer from under the build.
        with cache.holding(digests), streamed_build(digests, limits) as build:
            pulling = pull.submit(client, manifest, cache, build.arrivals, tracker, recorder, limits, max_bytes)
            # Whatever becomes of the pull (retries included), the unpack stage must stop waiting for layers.
            pulling.add_done_callback(build.downloads_ended)
            squashing = squash.submit(build.stream, scratch / "image.squashfs", target.compression,
                                      target.block_size, recorder)
            try:
                unpack(build, recorder)
            except Exception:
                pulling.result()  # a failed download is the cause of whatever else failed: raised first
                raise
            # A cancellation (the worker's SIGTERM, a Ctrl-C: not an Exception) does not wait for the
            # downloads: leaving the build stops them.
            pulling.result()
            return squashing.result()
    finally:
        if squashing is not None:
            # Leaving the build closed tar2sqfs's input, so the squash stage ends at once; it must have ended
            # before the scratch directory it writes in is removed, or the removal races its last files.
            squashing.wait()
