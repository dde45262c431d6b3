"""Imported by the warm worker's fork server (``deployments.warmworker``) before it forks any flow run: what each run's
process would otherwise make for itself, made once."""

import contextlib

from deployments.prefectclients import check_prefect_server_version, make_tls_context, tune_prefect_clients

tune_prefect_clients()
make_tls_context()
# Unchecked (the server down or of another version), each run's process checks for itself, and says what is wrong.
with contextlib.suppress(Exception):
    check_prefect_server_version()
