"""Fuzzing the REST API of a real ``imagegw serve`` from its own OpenAPI schema (schemathesis).

Every operation gets ``FUZZ_EXAMPLES`` generated requests (valid and invalid ones), once as an admin
with a fresh MUNGE credential each, once with whatever ``authentication`` header schemathesis makes up
(none, or garbage). No answer may be a server error, show a traceback, be anything but JSON, or have a
status the schema does not list for the call.
``bench/fuzz.py`` runs the same with many more examples.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, status_code_conformance
from schemathesis.errors import FailureGroup

from imagegw.service.gateway import LOOKUP_TYPES
from tests.serve_fixtures import PLATFORM, Served, serving, write_config
from testsupport.munge import RunningMunged
from testsupport.registry import RunningRegistry

FUZZ_EXAMPLES = int(os.environ.get("IMAGEGW_FUZZ_EXAMPLES", "25"))
"""Generated requests per operation and credential mode: CI's bound; bench/fuzz.py raises it."""
NOTIFY_SECRET = "fuzz-notify-secret"
TRACEBACK_MARKS = ("Traceback", 'File "', '.py", line')


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, registry: RunningRegistry,
           munged: RunningMunged) -> Iterator[Served]:
    """One gateway for the module: root is an admin and may import; fuzzed names may be pulled only from
    the test registry, one at a time, where they fail fast (no such manifest)."""
    root = tmp_path_factory.mktemp("fuzz")
    config = write_config(root, registry, munged, platform={"admins": ["root"], "maxConcurrentPulls": 1},
                          DefaultImageLocation=registry.host, AllowedRegistries=[registry.host],
                          ImportUsers=["root"], NotifySecret=NOTIFY_SECRET, Metrics=True)
    with serving(root, config) as running:
        yield running


@pytest.fixture(scope="module")
def served_schema(served: Served) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{served.api}/openapi.json")


@schemathesis.check
def no_traceback(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                 case: schemathesis.Case) -> None:
    """An answer never shows the gateway's insides (a Python traceback) to the caller."""
    shown = [mark for mark in TRACEBACK_MARKS if mark in response.text]
    if shown:
        raise AssertionError(f"the answer shows a traceback ({', '.join(shown)}): {response.text[:500]}")


@schemathesis.check
def json_answer(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                case: schemathesis.Case) -> None:
    """Every answer is ``application/json`` (Shifter's client reads nothing else); an error is
    ``{"error": "<message>"}``."""
    content_type = response.headers.get("content-type", ["(none)"])[0]
    if content_type != "application/json":
        raise AssertionError(f"content type {content_type}, not application/json: {response.text[:500]}")
    body = json.loads(response.text)
    if response.status_code >= 400 and not (isinstance(body, dict) and isinstance(body.get("error"), str)):
        raise AssertionError(f"a {response.status_code} without an 'error' message: {response.text[:500]}")


CHECKS = [not_a_server_error, status_code_conformance, no_traceback, json_answer]


def pinned_parameters(operation: schemathesis.APIOperation) -> list[dict[str, str]]:
    """Path parameters fixed to real values, besides none: a random system is only ever unknown (404), so
    most requests would end there without reaching the handling of image types, tags and bodies."""
    names = {parameter.name for parameter in operation.path_parameters}
    if "system" not in names:
        return [{}]
    if "itype" not in names:
        return [{}, {"system": PLATFORM}]
    return [{}, *({"system": PLATFORM, "itype": itype} for itype in LOOKUP_TYPES)]


def fuzz(schema: schemathesis.BaseSchema, headers: Callable[[], dict[str, str]]) -> list[str]:
    """Every operation's failures, each with the smallest request hypothesis found for it."""
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()
        cases = st.one_of(operation.as_strategy(GenerationMode.NEGATIVE),
                          *(operation.as_strategy(path_parameters=pinned) for pinned in pinned_parameters(operation)))

        @given(case=cases)
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def requests_to(case: schemathesis.Case) -> None:
            case.call_and_validate(headers=headers(), checks=CHECKS, timeout=30)

        try:
            requests_to()
        # FailureGroup (several checks failed) is a BaseExceptionGroup; every operation is fuzzed, then all
        # failures (check failures, or the request itself failing) reported.
        except (Exception, FailureGroup) as exc:
            failures.append(f"{operation.label}: {exc}")
    return failures


def test_fuzz_as_an_admin(served_schema: schemathesis.BaseSchema, munged: RunningMunged) -> None:
    """Past authentication, into every operation's own handling of what it is given."""
    def admin() -> dict[str, str]:
        return {"authentication": munged.mint(uid=0, gid=0), "authorization": f"Bearer {NOTIFY_SECRET}"}

    failures = fuzz(served_schema, admin)

    assert not failures, "\n\n".join(failures)


def test_fuzz_without_a_valid_credential(served_schema: schemathesis.BaseSchema) -> None:
    """The ``authentication`` header as generated: absent or garbage, never a credential munged accepts."""
    failures = fuzz(served_schema, dict)

    assert not failures, "\n\n".join(failures)
