"""``imagegw``: pull images, look them up, list them; run the gateway's services."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import gc
import getpass
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cli.localprefect import TemporaryPrefectServer
from cli.serve import serve, served_prefect_api
from deployments import deployment_name, work_pool_name
from imagegw.config import CONFIG_ENV, Settings, load_settings
from imagegw.errors import ConfigError, ImagegwError
from imagegw.plan import plan_pull, pull_key
from imagegw.registry import Credential, RegistryClient, RegistryLogin
from imagegw.registry.keychain import FLAGS, HandedCredential
from imagegw.service.userlogin import save_login
from imagegw.store import (
    ImageStore,
    PullKey,
    Status,
    ensure_embedded_server,
    open_store,
    to_response,
)
from imagegw.store.watchlist import open_watch_list
from imagegw.watch import parse_watched


def run() -> None:
    """The ``imagegw`` command: :func:`main`, then an exit that skips the interpreter's teardown.

    Freeing every module's objects one by one after Prefect's import, and pymongo's exit hook
    waiting up to half a second for its monitor threads to wake, were a large part of a re-pull's
    time (bench/README.md). Exit handlers registered after this one (Prefect's event and log delivery, an embedded
    server or Prefect's temporary server being stopped) still run first, as atexit runs them
    newest first.
    """
    status = 1  # what an exception escaping main() means

    def exit_now() -> None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    atexit.register(exit_now)
    status = main()
    sys.exit(status)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.command(args)
    except ImagegwError as exc:
        print(f"imagegw: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagegw", description="Image gateway for HPC clusters.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, handler: Any, help_text: str, *, image: bool = True, within: Any = None,
                image_help: str = "e.g. ubuntu:24.04 or myreg:5000/team/app:1") -> argparse.ArgumentParser:
        """A command acting on a platform (and an image, unless ``image`` is False); a subcommand ``within``."""
        sub = (within or commands).add_parser(name, help=help_text, description=help_text)
        if image:
            sub.add_argument("image", metavar="IMAGE", help=image_help)
        sub.add_argument("--platform", "-p", required=True, help="the platform (system) in the configuration")
        sub.add_argument("--config", "-c", help="imagemanager.json (default: $IMAGEGW_CONFIG)")
        sub.set_defaults(command=handler)
        return sub

    pull = command("pull", pull_command, "Pull an image and publish it as a squashfs; print its record.")
    pull.add_argument("--verbose", "-v", action="store_true", help="show Prefect's flow and task logs")
    registry_login = pull.add_mutually_exclusive_group()
    registry_login.add_argument("--registry-username", metavar="USER",
                                help="log in to the image's registry as USER (the password is asked for, "
                                     "hidden, unless --registry-password gives it); environment variables "
                                     "IMAGEGW_REGISTRY_* come first")
    pull.add_argument("--registry-password", metavar="PASSWORD", help="with --registry-username")
    registry_login.add_argument("--registry-token", metavar="TOKEN", help="a registry token, sent as it is")
    registry_login.add_argument("--registry-anon", action="store_true",
                                help="pull anonymously, whatever the configuration or docker config hold")
    command("lookup", lookup_command, "Print the READY record of an image, or exit 1.")
    command("images", images_command, "List the READY images of a platform.", image=False)
    login = command("login", login_command, "Ask for a user name and password for LOCATION, check them against its "
                    "registry, and save them as `shifterimg login` does (~/.udiRoot/.cred, mode 0600), so that "
                    "later pulls send them.", image=False)
    login.add_argument("location", metavar="LOCATION", nargs="?", default="default",
                       help="a location in the configuration's Locations, or 'default' (the default location)")
    watch = commands.add_parser("watch", help="Keep a platform's watch list: images its refresh flow holds READY.",
                                description="Keep a platform's watch list: images (or tag patterns such as "
                                            "'myreg:5000/team/app:v1.*') its refresh flow pulls and holds READY.")
    actions = watch.add_subparsers(required=True, metavar="ACTION")
    for name, handler, help_text, needs_image in (
            ("add", watch_add_command, "Watch an image or a tag pattern.", True),
            ("remove", watch_remove_command, "Stop watching an image or tag pattern.", True),
            ("list", watch_list_command, "Print the platform's watch list.", False)):
        command(name, handler, help_text, image=needs_image, within=actions,
                image_help="e.g. ubuntu:24.04 or myreg:5000/team/app:v1.*")

    def service(name: str, handler: Any, help_text: str, *, listens: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", "-c", help="imagemanager.json (default: $IMAGEGW_CONFIG)")
        if listens:
            sub.add_argument("--host", default="127.0.0.1", help="the API's address (default: %(default)s)")
            sub.add_argument("--port", type=int, default=8000, help="the API's port (default: %(default)s)")
        sub.set_defaults(command=handler)
        return sub

    gateway = service("serve", serve_command, "Run everything this host needs until Ctrl-C: the embedded "
                      "database (without MongoDBURI), a Prefect server with its UI (without PREFECT_API_URL), "
                      "a worker and the API.")
    gateway.add_argument("--prefect-port", type=int, default=4200,
                         help="port of the Prefect server and UI, on 127.0.0.1 only (default: %(default)s)")
    service("api", api_command, "Run only the REST API; PREFECT_API_URL names the Prefect server.")
    service("deploy", deploy_command, "Register every platform's work pool and pull deployment with the Prefect "
            "server in PREFECT_API_URL; remove the deployments of platforms no longer configured.", listens=False)
    worker = service("worker", worker_command, "Run only a worker for the platforms' pull deployments; "
                     "PREFECT_API_URL names the Prefect server.", listens=False)
    worker.add_argument("--platform", "-p", action="extend", nargs="+", default=[], metavar="P",
                        help="serve only these platforms (default: all in the configuration)")
    return parser


def pull_command(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    job = plan_pull(settings, pull_key(args.platform, args.image))
    _prepare_prefect(settings, verbose=args.verbose)
    server = _prefect_server_for_pull(settings)  # before Prefect's import: a server started now starts meanwhile
    from prefect import tags  # Prefect reads its settings at import, so import it late.

    from deployments.tlscontexts import share_tls_contexts
    from flows import import_run_time_modules
    from flows.pull import pull_image

    import_run_time_modules()  # while the temporary server, if any, still starts
    share_tls_contexts()  # the run makes a Prefect client for each task run
    # What is imported lives as long as this one-shot process: frozen, it is left out of the
    # garbage collector's passes, which otherwise walk all of Prefect's objects again and again.
    gc.freeze()

    flags = _flag_credential(args)
    store = open_store(settings)
    if server is not None:  # before the claim: a server that does not start leaves no record claimed
        server.use()
    record, claimed = store.claim_pull(job.key)
    if not claimed:
        raise ImagegwError(f"{job.key.tag} is already being pulled for {job.key.system} "
                           f"({record.get('status')}: {record.get('status_message')})")
    if flags is not None:
        store.store_login(job.key, flags)
    # Tagged by platform as the deployments' runs are, so the UI filters them alike.
    with _progress_shown(store, job.key, enabled=sys.stderr.isatty()), tags(f"platform:{args.platform}"):
        state = asyncio.run(pull_image(args.image, args.platform, str(settings.source), return_state=True))
    record = store.lookup(job.key) if state.is_completed() else None
    if record is None:
        failed = store.pull_record(job.key) or {**job.key.query(), "status": Status.FAILURE.value}
        _print_json(to_response(failed))
        print(f"imagegw: pull of {job.key.tag} failed: {failed.get('status_message', state.message)}",
              file=sys.stderr)
        return 1
    _print_json(to_response(record))
    squashfs = f"{job.platform.image_location}/{record['id']}.squashfs"
    print(f"imagegw: {job.key.tag} is READY: {squashfs}", file=sys.stderr)
    return 0


def _prefect_server_for_pull(settings: Settings) -> TemporaryPrefectServer | None:
    """Where the pull's flow run reports: PREFECT_API_URL; else the Prefect server of an ``imagegw serve`` on this
    state directory (the run then shows in the gateway's UI); else a temporary server, started here.

    With Prefect already imported (by a program calling :func:`main`), its settings decide, as they were read.
    """
    if os.environ.get("PREFECT_API_URL") or "prefect" in sys.modules:
        return None
    served = served_prefect_api(settings)
    if served is not None:
        os.environ["PREFECT_API_URL"] = served
        return None
    server = TemporaryPrefectServer.start(Path(os.environ["PREFECT_HOME"]),
                                          settings.state_dir / "logs" / "prefect-temporary-server.log")
    # Registered before Prefect's own exit handlers, so it runs after them: they deliver the run's last logs.
    atexit.register(server.stop)
    return server


def _flag_credential(args: argparse.Namespace) -> HandedCredential | None:
    """The credential the ``--registry-*`` flags give, handed to the flow run like a request's login."""
    if args.registry_password is not None and args.registry_username is None:
        raise ConfigError("--registry-password needs --registry-username")
    if args.registry_username is not None:
        password = args.registry_password
        if password is None:
            password = getpass.getpass(f"password of {args.registry_username}: ")
        credential = Credential("flag --registry-username", username=args.registry_username, password=password)
    elif args.registry_token is not None:
        credential = Credential("flag --registry-token", registry_token=args.registry_token)
    elif args.registry_anon:
        credential = Credential("flag --registry-anon")
    else:
        return None
    return HandedCredential(credential, FLAGS)


def lookup_command(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    job = plan_pull(settings, pull_key(args.platform, args.image))
    record = open_store(settings).lookup(job.key)
    if record is None:
        print(f"imagegw: no READY image {job.key.tag} on {job.key.system}", file=sys.stderr)
        return 1
    _print_json(to_response(record))
    return 0


def images_command(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    settings.platform(args.platform)
    records = open_store(settings).list_images(args.platform)
    rows = [("TAG", "ID", "SIZE", "PULLED", "EXPIRES")]
    for record in records:
        for tag in record.get("tag") or ["-"]:
            rows.append((tag, record["id"][:12], f"{record.get('size', 0) / 1e6:.1f} MB",
                         _when(record.get("last_pull")), _when(record.get("expiration"))))
    _print_table(rows)
    return 0


def login_command(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    platform = settings.platform(args.platform)
    name = settings.default_location if args.location == "default" else args.location
    if name not in settings.locations:
        raise ConfigError(f"location {args.location!r} is not in Locations of {settings.source} "
                          f"(there: {', '.join(sorted(settings.locations))})")
    location = settings.locations[name]
    username = input(f"user name for {location.host}: ").strip()
    password = getpass.getpass(f"password of {username}: ")
    if not username or not password:
        raise ConfigError("a login needs a user name and a password")
    credential = Credential(f"the login being saved for {args.location}", username=username, password=password)
    with RegistryClient(location, credential=credential, timeout=settings.registry_timeout) as client:
        checked = client.check_credential()
    path = save_login(Path.home(), platform.name, args.location, RegistryLogin(username, password),
                      platform.munge_socket)
    outcome = f"accepted by {location.host}" if checked else f"not checked: {location.host} asks for no login"
    print(f"login of {username} for {args.location} on {platform.name} {outcome}; saved in {path}", file=sys.stderr)
    return 0


def watch_add_command(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    settings.platform(args.platform)
    watched = parse_watched(args.image, settings)
    added = open_watch_list(settings).add(args.platform, watched.image, getpass.getuser())
    kind = "tag pattern" if watched.is_pattern else "image"
    print(f"{'watching' if added else 'already watching'} {kind} {watched.image} on {args.platform}; "
          "its refresh flow pulls what is not READY yet", file=sys.stderr)
    return 0


def watch_remove_command(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    settings.platform(args.platform)
    watched = parse_watched(args.image, settings)
    if not open_watch_list(settings).remove(args.platform, watched.image):
        print(f"imagegw: {args.platform} does not watch {watched.image}", file=sys.stderr)
        return 1
    print(f"no longer watching {watched.image} on {args.platform}; its images expire when unused", file=sys.stderr)
    return 0


def watch_list_command(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    settings.platform(args.platform)
    rows = [("IMAGE", "ADDED BY", "ADDED")]
    rows += [(entry.image, entry.added_by, _when(entry.added)) for entry in open_watch_list(settings).entries(
        args.platform)]
    _print_table(rows)
    return 0


def serve_command(args: argparse.Namespace) -> int:
    return serve(load_settings(args.config), host=args.host, port=args.port, prefect_port=args.prefect_port)


def api_command(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    _require_prefect_api()
    _prepare_prefect(settings, verbose=False)
    import uvicorn

    # Imported only now: it imports Prefect, which reads its settings at import.
    from api.app import app_from_environment

    # Each worker process builds its own app (uvicorn spawns them): they find the configuration here.
    os.environ[CONFIG_ENV] = str(settings.source)
    uvicorn.run(f"{app_from_environment.__module__}:{app_from_environment.__name__}", factory=True,
                host=args.host, port=args.port, workers=settings.api_workers)
    return 0


def worker_command(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    for name in args.platform:  # before the slow Prefect import, so a typo fails at once
        settings.platform(name)
    _require_prefect_api()
    _prepare_prefect(settings, verbose=True)
    # The worker's default 10 s poll would leave a triggered pull waiting that long to start.
    os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", "1")
    if settings.mongodb_uri is None:
        # Owned by this long-lived process; a flow run starting it would stop it under the other runs.
        ensure_embedded_server(settings.state_dir)
    # Imported only now: it imports Prefect, which reads its settings at import.
    from deployments.platforms import run_workers

    run_workers(settings, args.platform)
    return 0


def deploy_command(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    _require_prefect_api()
    _prepare_prefect(settings, verbose=False)
    # Imported only now: it imports Prefect, which reads its settings at import.
    from deployments.platforms import deploy_platforms

    done = deploy_platforms(settings)
    for name in done.deployed:
        print(f"deployed {deployment_name(name)} on work pool {work_pool_name(name)} "
              f"(at most {settings.platform(name).max_concurrent_pulls} at once), with its expire "
              f"({settings.expire_schedule}) and refresh ({settings.refresh_schedule}) schedules")
    for name in done.removed:
        print(f"removed {deployment_name(name)}: the platform is no longer configured (its work pool stays)")
    return 0


def _require_prefect_api() -> None:
    """The API and the workers must share a server: each would otherwise start its own temporary one."""
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError("set PREFECT_API_URL to the Prefect server the workers use "
                          "(e.g. http://127.0.0.1:4200/api), or run `imagegw serve`")


def _prepare_prefect(settings: Settings, *, verbose: bool) -> None:
    """Keep Prefect's state under the gateway's state directory unless the operator chose otherwise."""
    os.environ.setdefault("PREFECT_HOME", str(settings.state_dir / "prefect"))
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    # A gateway host is usually offline; telemetry would only time out (and print a notice).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    # A first ephemeral start runs the database migrations, which take long on a small host.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@contextmanager
def _progress_shown(store: ImageStore, key: PullKey, *, enabled: bool) -> Iterator[None]:
    """On a terminal, show the pull record's stage and message while the flow runs."""
    if not enabled:
        yield
        return
    stop = threading.Event()

    def show() -> None:
        shown = ""
        while not stop.wait(0.5):
            try:
                record = store.pull_record(key) or {}
            except ImagegwError:
                continue
            line = f"{record.get('status', '')}: {record.get('status_message', '')}"[:120]
            if line != shown:
                print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)
                shown = line
        print("\r\033[K", end="", file=sys.stderr, flush=True)

    watcher = threading.Thread(target=show, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _print_json(record: dict[str, Any]) -> None:
    print(json.dumps(record, indent=2, sort_keys=True, default=str))


def _when(epoch: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch)) if isinstance(epoch, (int, float)) else "-"

