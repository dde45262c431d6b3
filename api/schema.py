"""The OpenAPI schema as the API answers: the error statuses each call gives, and no 422.

FastAPI documents a 422 validation error on every call with parameters; this API answers those 400
(``api/errors.py``), like its other errors, as ``{"error": "<message>"}``. A client generated from the
schema, or a checker of it, must see the statuses it will get.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

_WHY = {
    400: "the request is malformed: a bad image name, image type, parameter or body",
    401: "no MUNGE credential, or munged refused it",
    403: "the caller may not do this (admins only, ImportUsers only, a wrong notification secret)",
    404: "no such platform, or no READY image of that name the caller may read",
    409: "the image index refused a record that conflicts with another",
    503: "a service the gateway needs (munged, MongoDB, Prefect, the registry) is unavailable",
}
CALLER_ERRORS = (400, 401, 404, 503)
"""What any call carrying a MUNGE credential may answer."""
_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


class ErrorAnswer(BaseModel):
    """Every error the gateway answers."""

    error: str


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route that may answer these error statuses."""
    return {status: {"model": ErrorAnswer, "description": _WHY[status]} for status in statuses}


def use_honest_schema(app: FastAPI) -> None:
    """Serve ``app``'s schema without FastAPI's 422 answers."""
    def schema() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            for operations in document.get("paths", {}).values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in _VALIDATION_SCHEMAS:
                document.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = schema  # type: ignore[method-assign]
