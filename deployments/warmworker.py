"""A process worker whose flow runs start warm: forked from a process that has already imported Prefect and the
flows, instead of a new ``python -m prefect.engine`` importing them again for each run.

Prefect's ``ProcessWorker`` starts every flow run as a new Python process (Prefect's workspace supervisor, which
then execs the engine), and a pull waited for those imports before its first stage. Here the worker starts one
``multiprocessing`` fork server at its start, which imports Prefect and the flows once (``_PRELOAD``); each flow
run is a child forked from it, which runs the run as ``python -m prefect.engine`` would (the flow run read by its
id, the flow taken from the modules the fork server imported, and run). Everything else is Prefect's own
worker: the polling, the pool's concurrency limit, the run's states, logs and task runs, and cancellation (the
run's process group gets SIGTERM, then SIGKILL), through the same executor as ``ProcessWorker``.

A new child per run keeps what the ``ProcessWorker`` gave: memory returned to the system when a run ends, and a
crash (or the OOM killer) taking one run, not the worker. Each child leads a process group of its own (what it
starts, tar2sqfs, is in it), so a cancel reaches all of it; and it dies with the fork server, which exits with
the worker, so no run outlives a worker killed outright.
"""

from __future__ import annotations

import contextlib
import contextvars
import multiprocessing
import os
import runpy
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio
import anyio.abc
import prefect.flow_engine
from prefect.flows import load_flow_from_flow_run
from prefect.runner._flow_run_executor import FlowRunExecutionResult, FlowRunExecutorContext
from prefect.runner._process_manager import ProcessHandle, create_isolated_termination_scope
from prefect.settings import Settings, get_current_settings
from prefect.utilities.processutils import sanitize_subprocess_env
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult

from deployments.prefectclients import tune_prefect_clients
from flows import RUN_TIME_IMPORTS
from imagegw.processes import die_with_parent

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun
    from prefect.runner._control_channel import ControlChannel

_FLOWS = ["flows.pull", "flows.expire", "flows.refresh"]
_PRELOAD = ["prefect.engine", *_FLOWS, __name__, *RUN_TIME_IMPORTS, "deployments.forkserverwarmup"]
"""What the fork server imports once: Prefect's engine and our flows, with the tasks and the domain they import, this
module (the child's code), what Prefect imports only once a flow runs (each run imported it again), and the
warm-up of what each run's Prefect clients make."""
_FORK_SERVER = multiprocessing.get_context("forkserver")


def start_fork_server() -> None:
    """Start the fork server and wait until it has imported ``_PRELOAD``, so that the first run does not wait for
    it. Once per worker process, before it takes runs."""
    _FORK_SERVER.set_forkserver_preload(_PRELOAD)
    probe = _FORK_SERVER.Process(target=int)  # forked once the server is ready: a no-op
    probe.start()
    probe.join()


# Registered under ProcessWorker's type, the type of the pools `imagegw deploy` creates: Prefect warns that the
# class replaces ProcessWorker in its registry of worker types (in this process only, which is what we want).
warnings.filterwarnings("ignore", message="Type 'WarmProcessWorker'", category=UserWarning)


class _SettingsEnvironment:
    """Prefect's settings as the environment variables Prefect gives each flow run's process, made once per settings
    object: Prefect makes them twice per run it submits (for the job's configuration, then for the process), 57 ms
    each here, a third of the worker's share of a run's start. Prefect replaces its settings, never changes them."""

    def __init__(self) -> None:
        self._made_from: Settings | None = None
        self._environment: dict[str, str] = {}

    def __call__(self) -> dict[str, str]:
        settings = get_current_settings()
        if settings is not self._made_from:
            self._environment = settings.to_environment_variables(exclude_unset=True)
            self._made_from = settings
        return dict(self._environment)


_prefect_environment = _SettingsEnvironment()


class _WarmJobConfiguration(ProcessJobConfiguration):
    @classmethod
    def _base_environment(cls) -> dict[str, str]:
        return _prefect_environment()


class WarmProcessWorker(ProcessWorker):
    """``ProcessWorker`` with each flow run forked from the fork server (``start_fork_server``)."""

    job_configuration = _WarmJobConfiguration

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._entrypoints: dict[UUID, str | None] = {}
        """Each deployment's flow as a preloaded module, read once: the fork server imported the flows once too,
        so a deployment changed to another flow needs the worker restarted either way."""

    async def run(self, flow_run: FlowRun, configuration: ProcessJobConfiguration,
                  task_status: anyio.abc.TaskStatus[int] | None = None) -> ProcessWorkerResult:
        # ProcessWorker.run with our starter in place of its command: the same executor owns the run's life.
        entrypoint = await self._preloaded_entrypoint(flow_run)
        async with FlowRunExecutorContext() as context:
            starter = _ForkedStarter(configuration.env, context.control_channel, entrypoint)
            executor = context.create_executor(flow_run, starter, resolve_flow=load_flow_from_flow_run,
                                               propose_submitting=False)
            execution: FlowRunExecutionResult | None = None

            async def execute(*, task_status: anyio.abc.TaskStatus[ProcessHandle] = anyio.TASK_STATUS_IGNORED
                              ) -> None:
                nonlocal execution
                execution = await executor.submit(task_status=task_status)

            async with anyio.create_task_group() as group:
                handle = await group.start(execute)
                (task_status or anyio.TASK_STATUS_IGNORED).started(handle.pid)
        if execution is None or execution.status_code is None:
            raise RuntimeError("Failed to start flow run process.")
        return ProcessWorkerResult(status_code=execution.status_code, identifier=str(execution.handle.pid))

    async def _preloaded_entrypoint(self, flow_run: FlowRun) -> str | None:
        """The flow of ``flow_run``'s deployment as a module the fork server imported (``flows.pull.pull_image``),
        if it is one. The run's process then takes the flow from its modules, as Prefect does given
        ``PREFECT__FLOW_ENTRYPOINT``, instead of reading the deployment and running its pull step, which only
        sets the working directory to this code's (0.15–0.35 s of a run's start in the worker's log)."""
        if flow_run.deployment_id is None:
            return None
        if flow_run.deployment_id not in self._entrypoints:
            deployment = await self.client.read_deployment(flow_run.deployment_id)
            path, _, function = (deployment.entrypoint or "").rpartition(":")
            module = path.removesuffix(".py").replace("/", ".")
            preloaded = f"{module}.{function}" if path.endswith(".py") and module in _FLOWS else None
            self._entrypoints[flow_run.deployment_id] = preloaded
        return self._entrypoints[flow_run.deployment_id]


class _ForkedStarter:
    """Starts one flow run in a child of the fork server and waits for it to exit (Prefect's ``ProcessStarter``)."""

    def __init__(self, environment: dict[str, str | None], control_channel: ControlChannel,
                 entrypoint: str | None) -> None:
        self._environment = environment
        self._control_channel = control_channel
        self._entrypoint = {"PREFECT__FLOW_ENTRYPOINT": entrypoint} if entrypoint else {}

    async def start(self, flow_run: FlowRun,
                    task_status: anyio.abc.TaskStatus[ProcessHandle] = anyio.TASK_STATUS_IGNORED) -> None:
        # What Prefect's starter gives the engine's process; the control channel is how the worker tells the run
        # that the SIGTERM which follows is a cancel.
        port, token = self._control_channel.register(flow_run.id)
        ours = {**os.environ, **_prefect_environment()}
        environment = sanitize_subprocess_env({
            **ours, **self._environment, **self._entrypoint,
            "PREFECT__FLOW_RUN_ID": str(flow_run.id), "PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS": "false",
            "PREFECT__CONTROL_PORT": str(port), "PREFECT__CONTROL_TOKEN": token})
        # The child has Prefect's settings as the fork server read them, as this process has them; the job's
        # environment (the work pool's or deployment's job variables) may change some: then it reads them again.
        settings_changed = any(ours.get(name) != value for name, value in self._environment.items()
                               if name.startswith("PREFECT_") and not name.startswith("PREFECT__"))
        process = _FORK_SERVER.Process(target=_run_flow_run, args=(environment, settings_changed),
                                       name=f"flow run {flow_run.id}")
        try:
            await anyio.to_thread.run_sync(process.start)
        except BaseException:
            self._control_channel.unregister(flow_run.id)
            raise
        assert process.pid is not None
        while not _leads_its_group(process.pid):  # a cancel signals the child's group: not before it has one
            await anyio.sleep(0.002)
        handle = ProcessHandle(process, termination_scope=create_isolated_termination_scope(process.pid))
        task_status.started(handle)
        try:
            await anyio.to_thread.run_sync(process.join, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():  # the worker stops under the run, as Prefect's starter: kill it
            with contextlib.suppress(ProcessLookupError):
                handle.hard_kill()
            raise


def _leads_its_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:  # it exited already: no group to wait for
        return True


def _run_flow_run(environment: dict[str, str], settings_changed: bool) -> None:
    """In the forked child: the flow run named in ``environment``, as ``python -m prefect.engine`` runs it, with
    Prefect's settings read again from it only if ``settings_changed`` (reading them is slow)."""
    os.setsid()  # a process group of its own, which the worker signals to cancel the run
    die_with_parent()  # the fork server, which exits when the worker does
    os.environ.clear()
    os.environ.update(environment)
    tune_prefect_clients()
    # Before it starts a deployment's flow run, Prefect's engine waits until a thread of its own watches for the run
    # being suspended (from the UI or the API): a subscription to the server's events, then a read of the run's
    # state, 0.1 s of each pull's start. Beside the run, nothing is missed: the watch's first read finds a
    # suspension made before it subscribed, and the engine looks for one as each task starts and ends.
    watch = prefect.flow_engine.observe_flow_run_suspension  # type: ignore[attr-defined]
    prefect.flow_engine.observe_flow_run_suspension = entered_beside(watch)  # type: ignore[attr-defined,assignment]
    from prefect.context import SettingsContext, get_settings_context

    settings = Settings() if settings_changed else get_current_settings()
    with SettingsContext(profile=get_settings_context().profile, settings=settings):
        sys.argv = ["prefect.engine"]  # the engine takes its flow run's id from PREFECT__FLOW_RUN_ID
        sys.modules.pop("prefect.engine")  # imported as a library: run afresh as __main__, as Prefect does
        runpy.run_module("prefect.engine", run_name="__main__", alter_sys=True)


def entered_beside(watch: Callable[..., AbstractContextManager[Any]]) -> Callable[..., AbstractContextManager[None]]:
    """``watch`` as a context manager that does not wait for it: it is entered in a thread of its own (in the caller's
    context variables) while the block runs, and left after the block, once entered."""

    @contextlib.contextmanager
    def beside(*args: Any, **kwargs: Any) -> Iterator[None]:
        watching = watch(*args, **kwargs)
        entered = threading.Event()

        def enter() -> None:
            watching.__enter__()
            entered.set()

        starting = threading.Thread(target=contextvars.copy_context().run, args=(enter,), daemon=True,
                                    name=f"entering {getattr(watch, '__name__', 'a watch')}")
        starting.start()
        try:
            yield
        finally:
            starting.join()
            if entered.is_set():
                watching.__exit__(None, None, None)

    return beside
