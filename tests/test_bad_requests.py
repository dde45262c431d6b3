"""Names the gateway cannot use get a 4xx whose message names what was wrong, through every call that
takes one: unknown systems and registries, over-long names, ``..`` and NUL (percent-encoded)."""

from __future__ import annotations

import pytest

from tests.api_fixtures import Api

TAGGED_CALLS = [("GET", "lookup"), ("POST", "pull"), ("GET", "expire"), ("POST", "doimport")]
"""Every call whose path ends in ``<system>/<type>/<tag>/``; the admin ``root`` may make them all."""

BAD_NAMES = [
    ("a" * 300 + ":1", "at most 255 characters"),
    ("h" * 3000 + ".example/app:1", "at most 255 characters"),
    ("app:" + "t" * 200, "at most 128"),
    ("..%2F..%2Fetc%2Fpasswd", "component '..'"),
    ("team%2F..%2Fapp:1", "component '..'"),
    ("app:..", "tag '..'"),
    ("app%00:1", "'app\\x00'"),
    ("app:1%00", "tag '1\\x00'"),
]


def call(api: Api, method: str, name: str, system: str, tag: str):
    body = {"filepath": "/nonexistent.squashfs"} if name == "doimport" else None
    itype = "custom" if name == "doimport" else "docker"
    return api.call(method, f"/api/{name}/{system}/{itype}/{tag}/", uid=0, gid=0, json=body)


@pytest.mark.parametrize(("method", "name"), TAGGED_CALLS)
def test_bad_names_are_400_saying_what_is_wrong(api: Api, method: str, name: str) -> None:
    for tag, words in BAD_NAMES:
        response = call(api, method, name, "mycluster", tag)

        assert response.status_code == 400, (tag[:40], response.text[:300])
        assert response.headers["content-type"] == "application/json"
        assert words in response.json()["error"], (tag[:40], response.json())
    assert api.launcher.launched == []


@pytest.mark.parametrize(("method", "name"), TAGGED_CALLS)
def test_an_unknown_system_is_404_naming_it(api: Api, method: str, name: str) -> None:
    response = call(api, method, name, "nosuchsystem", "app:1")

    assert response.status_code == 404
    assert "nosuchsystem" in response.json()["error"]


def test_a_registry_the_gateway_does_not_know_is_400_naming_it(api: Api) -> None:
    response = api.pull("unknown.example:5000/team/app:1")

    assert response.status_code == 400
    assert "registry unknown.example:5000 is not allowed" in response.json()["error"]
    assert api.launcher.launched == []


def test_a_path_no_call_takes_is_a_json_404_naming_it(api: Api) -> None:
    response = api.call("GET", "/api/nosuchcall/mycluster/")

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": "Not Found: GET /api/nosuchcall/mycluster/"}
