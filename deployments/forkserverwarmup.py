"""Imported by the warm worker's fork server (``deployments.warmworker``) before it forks any flow run: what each run's
process would otherwise make for itself, made once."""

from deployments.prefectclients import make_tls_context, tune_prefect_clients

tune_prefect_clients()
make_tls_context()
