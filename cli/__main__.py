"""``python -m cli``: how ``imagegw serve`` starts its worker and API."""

from cli.main import run

run()
