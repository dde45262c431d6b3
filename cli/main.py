"""``imagegw``: pull images, look them up, list them; run the gateway's services.

This module is what every command imports first, and it imports little: a command's own module
(``cli.commands``, ``cli.pull``) is imported once the arguments name it. A pull chooses, and if need be
starts, its Prefect server before that: a temporary server's start is the longest step of the command,
and it imports while the command does.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from cli.localprefect import prefect_server_for_pull, prepare_prefect_environment
from imagegw.config import load_settings
from imagegw.errors import ImagegwError

Handler = Callable[[argparse.Namespace], int] | str
"""What runs a command: a function, or the name of one in ``cli.commands``, imported only when it runs."""


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
    _drop_pymongo_exit_hook()
    sys.exit(status)


def _drop_pymongo_exit_hook() -> None:
    """pymongo's exit hook (:func:`run`): registered once a command imports pymongo, after ``run``'s own exit, it
    would run before that exit and join its monitor threads (0.2 s here)."""
    monitor = sys.modules.get("pymongo.synchronous.monitor")
    hook = getattr(monitor, "_shutdown_resources", None)
    if hook is not None:
        atexit.unregister(hook)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        command: Handler = args.command
        handler: Callable[[argparse.Namespace], int] = (
            getattr(importlib.import_module("cli.commands"), command) if isinstance(command, str) else command)
        return handler(args)
    except ImagegwError as exc:
        print(f"imagegw: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagegw", description="Image gateway for HPC clusters.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, help_text: str, *, image: bool = True, within: Any = None,
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
    command("lookup", "lookup_command", "Print the READY record of an image, or exit 1.")
    command("images", "images_command", "List the READY images of a platform.", image=False)
    login = command("login", "login_command", "Ask for a user name and password for LOCATION, check them against its "
                    "registry, and save them as `shifterimg login` does (~/.udiRoot/.cred, mode 0600), so that "
                    "later pulls send them.", image=False)
    login.add_argument("location", metavar="LOCATION", nargs="?", default="default",
                       help="a location in the configuration's Locations, or 'default' (the default location)")
    watch = commands.add_parser("watch", help="Keep a platform's watch list: images its refresh flow holds READY.",
                                description="Keep a platform's watch list: images (or tag patterns such as "
                                            "'myreg:5000/team/app:v1.*') its refresh flow pulls and holds READY.")
    actions = watch.add_subparsers(required=True, metavar="ACTION")
    for name, handler, help_text, needs_image in (
            ("add", "watch_add_command", "Watch an image or a tag pattern.", True),
            ("remove", "watch_remove_command", "Stop watching an image or tag pattern.", True),
            ("list", "watch_list_command", "Print the platform's watch list.", False)):
        command(name, handler, help_text, image=needs_image, within=actions,
                image_help="e.g. ubuntu:24.04 or myreg:5000/team/app:v1.*")

    def service(name: str, handler: Handler, help_text: str, *, listens: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", "-c", help="imagemanager.json (default: $IMAGEGW_CONFIG)")
        if listens:
            sub.add_argument("--host", default="127.0.0.1", help="the API's address (default: %(default)s)")
            sub.add_argument("--port", type=int, default=8000, help="the API's port (default: %(default)s)")
        sub.set_defaults(command=handler)
        return sub

    gateway = service("serve", "serve_command", "Run everything this host needs until Ctrl-C: the embedded "
                      "database (without MongoDBURI), a Prefect server with its UI (without PREFECT_API_URL), "
                      "a worker and the API.")
    gateway.add_argument("--prefect-port", type=int, default=4200,
                         help="port of the Prefect server and UI, on 127.0.0.1 only (default: %(default)s)")
    service("api", "api_command", "Run only the REST API; PREFECT_API_URL names the Prefect server.")
    service("deploy", "deploy_command", "Register every platform's work pool and pull deployment with the Prefect "
            "server in PREFECT_API_URL; remove the deployments of platforms no longer configured.", listens=False)
    worker = service("worker", "worker_command", "Run only a worker for the platforms' pull deployments; "
                     "PREFECT_API_URL names the Prefect server.", listens=False)
    worker.add_argument("--platform", "-p", action="extend", nargs="+", default=[], metavar="P",
                        help="serve only these platforms (default: all in the configuration)")
    commands.add_parser(
        "prepare", help="Prepare this user's first pull: keep a migrated Prefect database for fresh state directories.",
        description="Migrate a Prefect database once and keep it (~/.cache/imagegw) for the temporary Prefect "
                    "server of `imagegw pull` on a fresh state directory, which otherwise runs Prefect's migrations "
                    "itself (seconds). `./run setup` runs it; run it as each user who pulls without a running "
                    "`imagegw serve`, after installing or upgrading Prefect.").set_defaults(command="prepare_command")
    return parser


def pull_command(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    settings.platform(args.platform)
    prepare_prefect_environment(settings, verbose=args.verbose)
    server = prefect_server_for_pull(settings)  # first: a temporary server starts while the rest imports
    from cli.pull import pull  # the store, the registry client, Prefect and the flow: seconds of imports

    return pull(args, settings, server)
