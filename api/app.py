"""The REST API: Shifter's image gateway endpoints, thin over :mod:`imagegw.service.gateway`.

Every ``/api`` call but the root carries a MUNGE credential in the
``authentication`` header. Errors come back as ``{"error": ...}`` with the
status that ``api/errors.py`` assigns; responses are ``application/json`` with
a Content-Length, as Shifter's C client requires.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from api.errors import gateway_error, invalid_request, no_such_call
from api.health import check_health, vouches_for_admin
from api.lookups import FastLookups, quiet_found_lookups
from api.schema import CALLER_ERRORS, error_responses, use_honest_schema
from deployments.launcher import DeploymentLauncher
from imagegw.access import parse_acl
from imagegw.config import Settings, load_settings
from imagegw.errors import AuthenticationFailed, BadRequest, ImagegwError
from imagegw.service import (
    Caller,
    Gateway,
    PullLauncher,
    decode_credential,
    identify,
)
from imagegw.service.notify import check_secret, pull_pushed, pushed_tags

TAG = "{system}/{itype}/{tag:path}"
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def create_app(settings: Settings, launcher: PullLauncher | None = None) -> FastAPI:
    """The gateway's API for one configuration; pulls start flow runs through ``launcher``."""
    launch = launcher or DeploymentLauncher(settings)
    gateway = Gateway(settings, launch)
    app = FastAPI(title="imagegw", summary="Image gateway for HPC clusters (Shifter-compatible API)",
                  default_response_class=JSONResponse, redirect_slashes=False)
    app.add_exception_handler(ImagegwError, gateway_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, no_such_call)
    use_honest_schema(app)

    def authenticate(system: str, authentication: str | None) -> Caller:
        """The user the request's MUNGE credential vouches for, decoded by the system's munged."""
        platform = settings.platform(system)
        if not authentication:
            raise AuthenticationFailed("missing credential: send a MUNGE credential in the 'authentication' header")
        return identify(decode_credential(authentication, platform.munge_socket))

    async def caller(system: str, authentication: str | None = Header(default=None)) -> Caller:
        """Run on the event loop, not handed to a thread: munged answers in a tenth of a millisecond, less
        than the hand-over costs, and every call pays it."""
        return authenticate(system, authentication)

    def look_up(system: str, itype: str, tag: str, authentication: str | None) -> dict[str, Any]:
        return gateway.lookup(authenticate(system, authentication), system, itype, tag)

    app.add_middleware(FastLookups, answer=look_up)

    def route(method: str, path: str, *errors: int, **options: Any) -> Callable[[Endpoint], Endpoint]:
        """Register ``path`` with and without its trailing slash: Shifter's clients send both forms. ``errors``:
        the statuses it may answer besides CALLER_ERRORS."""
        def register(endpoint: Endpoint) -> Endpoint:
            documented = error_responses(*sorted({*CALLER_ERRORS, *errors}))
            app.api_route(path + "/", methods=[method], responses=documented, **options)(endpoint)
            app.api_route(path, methods=[method], include_in_schema=False)(endpoint)
            return endpoint
        return register

    @app.get("/")
    def root() -> dict[str, Any]:
        return {"service": "imagegw", "api": ["lookup", "pull", "expire", "list", "queue", "metrics", "notify"]}

    @app.get("/healthz", responses={503: {"description": "a service the gateway needs is down (the same body)"}})
    def healthz(authentication: str | None = Header(default=None)) -> JSONResponse:
        """Which of the services the gateway needs are up; why one is down only for a platform's admins."""
        health = check_health(settings)
        answer = health.details() if vouches_for_admin(settings, authentication) else health.summary()
        return JSONResponse(answer, status_code=200 if health.healthy else 503)

    @route("GET", "/api/list/{system}")
    def list_images(system: str, who: Caller = Depends(caller)) -> dict[str, Any]:
        return {"list": gateway.list_images(who, system)}

    @route("GET", f"/api/lookup/{TAG}")
    def lookup(system: str, itype: str, tag: str, authentication: str | None = Header(default=None)) -> dict[str, Any]:
        """Declared for the schema: FastLookups (api/lookups.py) answers these requests before routing."""
        return look_up(system, itype, tag, authentication)

    @route("POST", f"/api/pull/{TAG}", 409)
    def pull(system: str, itype: str, tag: str, who: Caller = Depends(caller),
             body: dict[str, Any] = Depends(_json_body)) -> dict[str, Any]:
        return gateway.pull(who, system, itype, tag, parse_acl(body))

    @route("POST", f"/api/doimport/{TAG}", 403, 409)
    def doimport(system: str, itype: str, tag: str, who: Caller = Depends(caller),
                 body: dict[str, Any] = Depends(_json_body)) -> dict[str, Any]:
        return gateway.import_image(who, system, itype, tag, body)

    @route("GET", f"/api/expire/{TAG}", 403)
    def expire(system: str, itype: str, tag: str, who: Caller = Depends(caller)) -> dict[str, Any]:
        gateway.expire(who, system, itype, tag)
        return {"status": True}

    @route("GET", "/api/autoexpire/{system}", 403)
    def autoexpire(system: str, who: Caller = Depends(caller)) -> dict[str, Any]:
        return {"status": gateway.autoexpire(who, system)}

    @route("GET", "/api/queue/{system}")
    def queue(system: str, who: Caller = Depends(caller)) -> dict[str, Any]:
        return {"list": gateway.queue(who, system)}

    @route("GET", "/api/metrics/{system}", 403)
    def metrics(system: str, limit: int = 10, who: Caller = Depends(caller)) -> list[dict[str, Any]]:
        return gateway.metrics(who, system, limit)

    def registry(authorization: str | None = Header(default=None)) -> None:
        """A notification must carry NotifySecret: checked before its body is read."""
        check_secret(settings, authorization)

    @route("POST", "/api/notify", 403)
    def notify(_: None = Depends(registry), body: dict[str, Any] = Depends(_json_body)) -> dict[str, Any]:
        """A registry's push notification (Distribution or Harbor), authenticated by NotifySecret, not MUNGE."""
        return {"pulls": [vars(pull) for pull in pull_pushed(settings, launch, pushed_tags(body))]}

    return app


def app_from_environment() -> FastAPI:
    """The app of the configuration ``$IMAGEGW_CONFIG`` names: what each API worker process builds."""
    quiet_found_lookups()
    return create_app(load_settings())


async def _json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; an empty body (shifterimg's pull without ACLs) is ``{}``."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body
