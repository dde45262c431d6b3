"""The image pipeline: pull → unpack → squash → transfer → index."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from prefect import flow

from imagegw.build.arrivals import LayerArrivals
from imagegw.config import Settings, load_settings
from imagegw.store.mongo import open_index
from imagegw.errors import ImagegwError
from imagegw.store.records import HEARTBEAT_INTERVAL, PullKey
from imagegw.plan import PullJob, pull_key
from imagegw.background import repeated
from imagegw.registry.client import ResolvedImage
from imagegw.build.squash import ImageStream, SquashResult
from tasks.index import index, is_ready, plan, settle_access
from tasks.pull import pull, resolve
from tasks.squash import squash
from tasks.transfer import transfer
from tasks.unpack import unpack


# Async, though every stage blocks: Prefect ends a sync flow run by joining a thread that
# sleeps in 1 s steps, which alone would be a third of a small pull.
@flow(name="pull-image", flow_run_name="pull {image} for {platform}")
async def pull_image(image: str, platform: str, config: str | None = None) -> dict[str, Any]:
    """Pull an image from its registry and publish it as a squashfs on one platform."""
    settings = load_settings(config)
    settings.platform(platform)
    key = pull_key(platform, image)
    with failure_recorded(settings, key), heartbeat(settings, key), scratch_directory(settings) as scratch:
        job = plan(settings, key)
        manifest = resolve(job)
        access = settle_access(job, manifest)
        squashfs = None
        if not is_ready(job, manifest):  # an unchanged digest is neither downloaded nor converted again
            squashfs = pull_unpack_squash(job, manifest, scratch)
        published = transfer(job, manifest, access, squashfs)
        return index(job, manifest, published, access)


def pull_unpack_squash(job: PullJob, manifest: ResolvedImage, scratch: Path) -> SquashResult:
    """The three stages run side by side, like a shell pipeline: each layer is flattened into
    the tar stream as it downloads, and tar2sqfs compresses the stream as it is written."""
    arrivals = LayerArrivals([layer.digest for layer in manifest.layers])
    stream = ImageStream()
    try:
        pulling = pull.submit(job, manifest, arrivals)
        # Whatever becomes of the pull (retries included), the unpack stage must stop waiting for layers.
        pulling.add_done_callback(lambda _: arrivals.close("the pull stage ended without it"))
        squashing = squash.submit(job, stream, scratch)
        try:
            unpack(arrivals, stream)
        finally:
            pulling.result()  # a failed download is the cause of whatever else failed: raised first
        return squashing.result()
    finally:
        arrivals.release()
        stream.close_reader()


@contextmanager
def failure_recorded(settings: Settings, key: PullKey) -> Iterator[None]:
    """Whatever stops the pipeline is written to the pull record as FAILURE, with its message."""
    try:
        yield
    except Exception as exc:
        open_index(settings).fail_pull(key, str(exc) or type(exc).__name__)
        raise


@contextmanager
def heartbeat(settings: Settings, key: PullKey) -> Iterator[None]:
    """Beat the pull record while the flow runs, so a pull whose run died is seen as stale."""

    def beat() -> None:
        with suppress(ImagegwError):  # a missed beat is made up by the next
            open_index(settings).beat(key)

    with repeated(beat, HEARTBEAT_INTERVAL, f"heartbeat {key.tag}"):
        yield


@contextmanager
def scratch_directory(settings: Settings) -> Iterator[Path]:
    """A private working directory under ExpandDirectory, removed however the pull ends."""
    settings.expand_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pull-", dir=settings.expand_dir) as scratch:
        yield Path(scratch)
