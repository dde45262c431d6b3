"""``imagegw pull``, once its Prefect server is chosen: the flow run in this process, and its record printed.

Imported by ``cli.main`` only then: Prefect, imported here, reads its settings (the server's URL) at import.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import getpass
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import tags

from cli.localprefect import TemporaryPrefectServer
from cli.output import print_json
from deployments.prefectclients import tune_prefect_clients
from flows import import_run_time_modules
from flows.pull import pull_image
from imagegw.config import Settings
from imagegw.errors import ConfigError, ImagegwError
from imagegw.plan import plan_pull, pull_key
from imagegw.registry import Credential
from imagegw.registry.keychain import FLAGS, HandedCredential
from imagegw.store import ImageStore, PullKey, Status, open_store, to_response


def pull(args: argparse.Namespace, settings: Settings, server: TemporaryPrefectServer | None) -> int:
    """Pull ``args.image`` for ``args.platform`` in a flow run of this process, reporting to ``server`` if one
    was started for it; print the record."""
    job = plan_pull(settings, pull_key(args.platform, args.image))
    import_run_time_modules()  # while the temporary server, if any, still starts
    tune_prefect_clients()  # the run makes a Prefect client for each task run
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
        print_json(to_response(failed))
        print(f"imagegw: pull of {job.key.tag} failed: {failed.get('status_message', state.message)}",
              file=sys.stderr)
        return 1
    print_json(to_response(record))
    squashfs = f"{job.platform.image_location}/{record['id']}.squashfs"
    print(f"imagegw: {job.key.tag} is READY: {squashfs}", file=sys.stderr)
    return 0


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
