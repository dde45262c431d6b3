"""``GET /api/lookup``, answered before FastAPI's per-request machinery.

A lookup runs at every job start, so it is the call a site's load is made of. Profiled under 16
clients (``bench/lookups.py --profile``), FastAPI's routing, dependency solving, validation, response
serialisation and the hand-over to a worker thread took two thirds of a lookup's CPU in the API, the
gateway's own work (MUNGE, the index) a fifth. This middleware matches the lookup path itself and
calls the same functions the route does; every other request, and a lookup path it does not
match, goes on to the app. The route stays declared in the app for the OpenAPI schema.

A lookup that found its image is not written to the access log (:class:`QuietFoundLookups`): with one
per job start, such lines would be most of the log, and writing them cost a twentieth of the API's
CPU. A lookup that failed is logged like any request.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import status_for
from imagegw.errors import ImagegwError

LookupAnswer = Callable[[str, str, str, str | None], dict[str, Any]]
"""(system, itype, tag, the ``authentication`` header) → the image's record, or a gateway error."""

# The route's own pattern ("/api/lookup/{system}/{itype}/{tag:path}", with or without a trailing slash).
_LOOKUP_PATH = re.compile(r"/api/lookup/(?P<system>[^/]+)/(?P<itype>[^/]+)/(?P<tag>.+?)/?")


class FastLookups:
    """ASGI middleware answering well-formed lookups with ``answer``."""

    def __init__(self, app: ASGIApp, answer: LookupAnswer) -> None:
        self.app = app
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        matched = _lookup(scope)
        if matched is None:
            await self.app(scope, receive, send)
            return
        system, itype, tag = matched
        try:
            answer, status = self.answer(system, itype, tag, _header(scope, b"authentication")), 200
        except ImagegwError as error:
            answer, status = {"error": str(error)}, status_for(error)
        await JSONResponse(answer, status_code=status)(scope, receive, send)


def _lookup(scope: Scope) -> tuple[str, str, str] | None:
    if scope["type"] != "http" or scope["method"] != "GET":
        return None
    matched = _LOOKUP_PATH.fullmatch(scope["path"])
    return None if matched is None else (matched["system"], matched["itype"], matched["tag"])


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


class QuietFoundLookups(logging.Filter):
    """Drops uvicorn's access-log record of a lookup answered 200; keeps every other request's."""

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn's access record: (client address, method, path with query, HTTP version, status).
        fields = record.args
        if not isinstance(fields, tuple) or len(fields) != 5:
            return True
        _, method, path, _, status = fields
        return not (status == 200 and method == "GET" and str(path).startswith("/api/lookup/"))


def quiet_found_lookups() -> None:
    """Keep found lookups out of this process's access log (uvicorn's ``uvicorn.access`` logger)."""
    logging.getLogger("uvicorn.access").addFilter(QuietFoundLookups())
