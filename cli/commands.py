"""The commands other than ``imagegw pull`` (``cli.pull``), imported by ``cli.main`` once one of them is asked for."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from cli.localprefect import prepare_prefect_environment, prepare_template, template_path
from cli.output import print_json, print_table, when
from cli.serve import serve
from deployments import deployment_name, work_pool_name
from imagegw.config import CONFIG_ENV, load_settings
from imagegw.errors import ConfigError
from imagegw.plan import plan_pull, pull_key
from imagegw.registry import Credential, RegistryClient, RegistryLogin
from imagegw.service.userlogin import save_login
from imagegw.store import ensure_embedded_server, open_store, to_response
from imagegw.store.watchlist import open_watch_list
from imagegw.watch import parse_watched


def prepare_command(args: argparse.Namespace) -> int:
    made = prepare_template()
    if made is not None:
        print(f"kept a migrated Prefect database as {made}")
    elif template_path().exists():
        print(f"nothing to do: {template_path()} is there")
    else:
        print("nothing to do: Prefect is set to a database of its own (PREFECT_API_DATABASE_CONNECTION_URL)")
    return 0


def lookup_command(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    job = plan_pull(settings, pull_key(args.platform, args.image))
    record = open_store(settings).lookup(job.key)
    if record is None:
        print(f"imagegw: no READY image {job.key.tag} on {job.key.system}", file=sys.stderr)
        return 1
    print_json(to_response(record))
    return 0


def images_command(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    settings.platform(args.platform)
    records = open_store(settings).list_images(args.platform)
    rows = [("TAG", "ID", "SIZE", "PULLED", "EXPIRES")]
    for record in records:
        for tag in record.get("tag") or ["-"]:
            rows.append((tag, record["id"][:12], f"{record.get('size', 0) / 1e6:.1f} MB",
                         when(record.get("last_pull")), when(record.get("expiration"))))
    print_table(rows)
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
    rows += [(entry.image, entry.added_by, when(entry.added)) for entry in open_watch_list(settings).entries(
        args.platform)]
    print_table(rows)
    return 0


def serve_command(args: argparse.Namespace) -> int:
    return serve(load_settings(args.config), host=args.host, port=args.port, prefect_port=args.prefect_port)


def api_command(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    _require_prefect_api()
    prepare_prefect_environment(settings, verbose=False)
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
    prepare_prefect_environment(settings, verbose=True)
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
    prepare_prefect_environment(settings, verbose=False)
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
