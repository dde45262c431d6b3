"""One Prefect work pool per platform, with a deployment of the pull flow and ones of the scheduled expire
and refresh flows, so each cluster's pulls can be watched, started and limited on its own in the Prefect UI, and run
by workers on any host.

``imagegw deploy`` registers them from the configuration; ``imagegw worker --platform P`` runs a
process worker on P's pool (any number of them, on any hosts that have this package, the
configuration, and reach the Prefect API and MongoDB). The pulls, in the pool's default queue, are held to the
platform's ``maxConcurrentPulls`` by every worker of the pool together. The scheduled expire and refresh runs have a
queue of their own with one slot more in the pool, so that a long refresh (hundreds of tags, a registry timing out)
never keeps a user's pull waiting, and two of them never run at once (Prefect starts every schedule missed while the
server was down as soon as it is back).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.exceptions import ObjectNotFound
from prefect.workers.process import ProcessWorker

import flows
from deployments import doorbell, work_pool_name, worker_name
from deployments.orphans import SWEEP_INTERVAL, hand_on_orphaned_runs, pull_silence_in
from deployments.prefectclients import tune_prefect_clients
from deployments.warmworker import WarmProcessWorker, start_fork_server
from flows import EXPIRE_FLOW, PULL_FLOW, REFRESH_FLOW
from flows.expire import expire_images
from flows.pull import pull_image
from flows.refresh import refresh_images
from imagegw.config import Platform, Settings
from imagegw.errors import ConfigError
from imagegw.housekeeping import remove_dead_pulls_leftovers
from imagegw.registry import LayerCache
from imagegw.store import open_store

_CODE_ROOT = Path(flows.__file__).resolve().parent.parent
"""Where the flow's code is on this host; a worker's host must have it at the same path."""
_PULL_ENTRYPOINT = "flows/pull.py:pull_image"
_EXPIRE_ENTRYPOINT = "flows/expire.py:expire_images"
_REFRESH_ENTRYPOINT = "flows/refresh.py:refresh_images"
PULL_QUEUE = "default"
"""The queue of a platform's pulls: the one Prefect makes with every pool."""
MAINTENANCE_QUEUE = "maintenance"
"""The queue of a platform's scheduled expire and refresh runs."""
MAINTENANCE_RUNS = 1
"""Scheduled runs of a platform at once, beside its pulls."""


@dataclass(frozen=True)
class Deployed:
    """What ``deploy_platforms`` did."""

    deployed: list[str]
    """Platforms whose pool and deployment are in place."""
    removed: list[str]
    """Deployments of platforms no longer in the configuration, deleted."""


def deploy_platforms(settings: Settings) -> Deployed:
    """Create or update every platform's work pool and deployment; delete the deployments of platforms
    the configuration no longer has (their pools stay, empty, for an operator to remove)."""
    with get_client(sync_client=True) as client:
        for platform in settings.platforms.values():
            _ensure_pool(client, platform)
        pull = pull_image.from_source(source=str(_CODE_ROOT), entrypoint=_PULL_ENTRYPOINT)
        expire = expire_images.from_source(source=str(_CODE_ROOT), entrypoint=_EXPIRE_ENTRYPOINT)
        refresh = refresh_images.from_source(source=str(_CODE_ROOT), entrypoint=_REFRESH_ENTRYPOINT)
        for name, platform in settings.platforms.items():
            common = {"name": name, "work_pool_name": work_pool_name(name), "tags": [f"platform:{name}"],
                      "parameters": {"platform": name, "config": str(settings.source)},
                      "build": False, "push": False, "print_next_steps": False, "ignore_warnings": True}
            pull.deploy(description=f"Pull an image and publish it into {platform.image_location}", **common)
            expire.deploy(description=f"Remove the images of {name} past their expiration",
                          cron=settings.expire_schedule, work_queue_name=MAINTENANCE_QUEUE, **common)
            refresh.deploy(description=f"Pull again the tags in use or watched on {name} whose digest moved",
                           cron=settings.refresh_schedule, work_queue_name=MAINTENANCE_QUEUE, **common)
        removed = []
        ours = FlowFilter(name=FlowFilterName(any_=[PULL_FLOW, EXPIRE_FLOW, REFRESH_FLOW]))
        for deployment in client.read_deployments(flow_filter=ours):
            if deployment.name not in settings.platforms:
                client.delete_deployment(deployment.id)
                removed.append(deployment.name)
    return Deployed(deployed=list(settings.platforms), removed=sorted(set(removed)))


def pool_concurrency(platform: Platform) -> int:
    """Runs of ``platform`` at once, of its pool and of each of its workers: its pulls and its scheduled runs."""
    return platform.max_concurrent_pulls + MAINTENANCE_RUNS


def _ensure_pool(client: SyncPrefectClient, platform: Platform) -> None:
    name = work_pool_name(platform.name)
    try:
        client.read_work_pool(name)
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(
            name=name, type=ProcessWorker.type, concurrency_limit=pool_concurrency(platform),
            description=f"Pulls of the platform {platform.name}",
            base_job_template=ProcessWorker.get_default_base_job_template()))
    else:
        client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=pool_concurrency(platform)))
    _ensure_queue(client, name, PULL_QUEUE, platform.max_concurrent_pulls, f"Pulls of {platform.name}")
    _ensure_queue(client, name, MAINTENANCE_QUEUE, MAINTENANCE_RUNS,
                  f"The scheduled expire and refresh runs of {platform.name}, beside its pulls")


def _ensure_queue(client: SyncPrefectClient, pool: str, queue: str, limit: int, description: str) -> None:
    try:
        existing = client.read_work_queue_by_name(queue, work_pool_name=pool)
    except ObjectNotFound:
        client.create_work_queue(queue, description=description, concurrency_limit=limit, work_pool_name=pool)
    else:
        client.update_work_queue(existing.id, concurrency_limit=limit, description=description)


def run_workers(settings: Settings, platforms: Collection[str] = ()) -> None:
    """Run a process worker on the pool of each of ``platforms`` (default: every one) until SIGINT or SIGTERM; each
    flow run is forked from a process that has imported Prefect and the flows once (``deployments.warmworker``).

    First the scratch directories and partial downloads of pulls that died on this host (a worker killed
    with its runs, the host rebooted) are removed: their records are taken over by the next request, and
    nothing else would remove their files before the expire flow a day later.
    """
    names = list(platforms) or list(settings.platforms)
    leftovers = remove_dead_pulls_leftovers(LayerCache(settings.cache_dir), settings.expand_dir)
    if leftovers.removed:
        print(f"imagegw worker: removed {leftovers.removed} leftovers of dead pulls "
              f"({leftovers.bytes_removed / 1e6:.1f} MB) under {settings.expand_dir} and {settings.cache_dir}",
              file=sys.stderr, flush=True)
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                client.read_work_pool(work_pool_name(name))
            except ObjectNotFound:
                raise ConfigError(f"the work pool {work_pool_name(name)} does not exist on the Prefect server: "
                                  "run `imagegw deploy` first") from None
    tune_prefect_clients()
    start_fork_server()  # before any run is taken: the first one must not wait for its imports

    async def work() -> None:
        async with anyio.create_task_group() as workers:
            for name in names:
                worker = WarmProcessWorker(
                    work_pool_name=work_pool_name(name), name=worker_name(name, os.getpid()),
                    create_pool_if_not_found=False, limit=pool_concurrency(settings.platform(name)))
                workers.start_soon(_serve, worker, settings, name)

    anyio.run(work)


async def _serve(worker: WarmProcessWorker, settings: Settings, platform: str) -> None:
    """Run ``worker``, polling at its interval and whenever its doorbell rings (``deployments.doorbell``), and handing
    on the runs dead workers of its pool left (``deployments.orphans``)."""
    async with worker, await anyio.create_udp_socket(local_host="127.0.0.1") as bell:
        with doorbell.hung(settings.state_dir, platform, bell.extra(anyio.abc.SocketAttribute.local_port)):
            async with anyio.create_task_group() as group:
                group.start_soon(_answer, bell, worker)
                group.start_soon(_sweep_orphaned_runs, worker, settings, platform)
                await worker.start()
                group.cancel_scope.cancel()


async def _sweep_orphaned_runs(worker: WarmProcessWorker, settings: Settings, platform: str) -> None:
    """As the worker starts and every SWEEP_INTERVAL after: schedule again the runs dead workers took and never
    started, and poll at once if there were any; crash those they left running (``deployments.orphans``)."""
    while True:
        try:
            store = await anyio.to_thread.run_sync(open_store, settings)
            orphans = await hand_on_orphaned_runs(worker.client, platform, worker.name, pull_silence_in(store))
        except Exception as exc:  # a server or the database busy or restarting: the next sweep tries again
            print(f"imagegw worker: cannot look for the runs dead workers of {platform} left: {exc}",
                  file=sys.stderr, flush=True)
        else:
            for orphan in orphans:
                print(f"imagegw worker: flow run {orphan.run_name} ({orphan.run_id}): {orphan.reason(worker.name)}",
                      file=sys.stderr, flush=True)
            if any(not orphan.started for orphan in orphans):
                await worker.get_and_submit_flow_runs()
        await anyio.sleep(SWEEP_INTERVAL)


async def _answer(bell: anyio.abc.UDPSocket, worker: WarmProcessWorker) -> None:
    async for _ in bell:
        await worker.get_and_submit_flow_runs()
