"""The one table that maps the gateway's errors to HTTP status codes."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from imagegw.errors import (
    AuthenticationFailed,
    BadImageReference,
    BadRequest,
    ConfigError,
    Forbidden,
    ImagegwError,
    ImageNotFound,
    RecordConflict,
    ServiceUnavailable,
    TransferError,
    UnknownPlatform,
)

# Most specific first: UnknownPlatform is a ConfigError, IndexUnavailable a ServiceUnavailable.
HTTP_STATUS: tuple[tuple[type[ImagegwError], int], ...] = (
    (AuthenticationFailed, 401),
    (Forbidden, 403),
    (UnknownPlatform, 404),
    (ImageNotFound, 404),
    (RecordConflict, 409),
    (BadImageReference, 400),
    (BadRequest, 400),
    (ServiceUnavailable, 503),
    (TransferError, 503),
    (ConfigError, 500),
)


def status_for(error: ImagegwError) -> int:
    """The HTTP status of a gateway error; an error the table does not name is the gateway's fault."""
    for kind, status in HTTP_STATUS:
        if isinstance(error, kind):
            return status
    return 500


async def gateway_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ImagegwError)
    return JSONResponse({"error": str(error)}, status_code=status_for(error))


async def invalid_request(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    problems = "; ".join(f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
                         for item in error.errors())
    return JSONResponse({"error": f"bad request: {problems}"}, status_code=400)


async def no_such_call(request: Request, error: Exception) -> JSONResponse:
    """A path or method no route takes (404, 405), as ``{"error": ...}`` like every other answer."""
    assert isinstance(error, HTTPException)
    return JSONResponse({"error": f"{error.detail}: {request.method} {request.url.path}"},
                        status_code=error.status_code, headers=error.headers)
