"""Image names: Docker Hub naming, locations, registries with ports, digests, bad names."""

from __future__ import annotations

import pytest

from imagegw.config import Location
from imagegw.errors import BadImageReference
from imagegw.registry.reference import normalize_tag, parse_image_reference

HUB = Location("index.docker.io", "https://registry-1.docker.io")
SITE = Location("site", "http://127.0.0.1:5000")
LOCATIONS = {"index.docker.io": HUB, "site": SITE}
DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("name, registry, repository, tag, digest", [
    ("ubuntu", "registry-1.docker.io", "library/ubuntu", "latest", None),
    ("ubuntu:24.04", "registry-1.docker.io", "library/ubuntu", "24.04", None),
    ("nersc/app:1", "registry-1.docker.io", "nersc/app", "1", None),
    ("docker.io/nginx", "registry-1.docker.io", "library/nginx", "latest", None),
    ("site/team/app:2", "127.0.0.1:5000", "team/app", "2", None),
    ("myreg:5000/team/app:1", "myreg:5000", "team/app", "1", None),
    ("localhost/app", "localhost", "app", "latest", None),
    (f"ubuntu@{DIGEST}", "registry-1.docker.io", "library/ubuntu", None, DIGEST),
    (f"myreg:5000/app:1@{DIGEST}", "myreg:5000", "app", "1", DIGEST),
])
def test_names_resolve_to_registry_repository_and_reference(name, registry, repository, tag, digest) -> None:
    ref = parse_image_reference(name, LOCATIONS, "index.docker.io")

    assert (ref.location.host, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)


def test_default_location_is_used_for_bare_names() -> None:
    ref = parse_image_reference("team/app", LOCATIONS, "site")

    assert ref.location is SITE and ref.repository == "team/app"


@pytest.mark.parametrize("name, problem", [
    ("", "empty"),
    ("Ubuntu", "lower-case"),
    ("ubuntu:", "tag ''"),
    ("ubuntu:-bad", "tag '-bad'"),
    ("ubuntu@sha256:abc", "digest"),
    ("a//b", "component ''"),
    ("a" * 256, "at most 255"),
])
def test_bad_names_say_what_is_wrong(name: str, problem: str) -> None:
    with pytest.raises(BadImageReference, match=problem):
        parse_image_reference(name, LOCATIONS, "index.docker.io")


@pytest.mark.parametrize("name, tag", [
    ("ubuntu", "ubuntu:latest"),
    ("ubuntu:22.04", "ubuntu:22.04"),
    ("myreg:5000/app", "myreg:5000/app:latest"),
    (f"app@{DIGEST}", f"app@{DIGEST}"),
])
def test_records_are_filed_under_the_name_with_latest_added(name: str, tag: str) -> None:
    assert normalize_tag(name) == tag
