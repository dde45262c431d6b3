"""Who may read an image: the access policy as users meet it."""

from __future__ import annotations

import pytest

from imagegw.access import PUBLIC, Access, AclRequest, parse_acl, settle_access
from imagegw.errors import BadRequest

ALICE = Access(True, (1000,), (100,))
BOB = Access(True, (2000,), (200,))


def test_a_private_image_is_read_by_its_users_groups_and_admins_only() -> None:
    assert ALICE.allows(1000, frozenset())
    assert ALICE.allows(7, frozenset({100, 60}))
    assert not ALICE.allows(7, frozenset({60}))
    assert ALICE.allows(7, frozenset(), admin=True)
    assert PUBLIC.allows(7, frozenset())


def test_bytes_anyone_could_pull_stay_public() -> None:
    assert settle_access(None, PUBLIC) == PUBLIC
    assert settle_access(ALICE, PUBLIC) == PUBLIC
    assert settle_access(PUBLIC, BOB) == PUBLIC


def test_two_private_pulls_of_one_image_share_it() -> None:
    assert settle_access(None, ALICE) == ALICE
    assert settle_access(ALICE, BOB) == Access(True, (1000, 2000), (100, 200))


def test_a_fresh_image_serves_a_request_only_if_its_access_covers_it() -> None:
    shared = Access(True, (1000, 2000), (100, 200))

    assert PUBLIC.covers(PUBLIC)
    assert not ALICE.covers(PUBLIC)
    assert not PUBLIC.covers(ALICE)
    assert shared.covers(ALICE)
    assert not ALICE.covers(shared)


def test_the_requester_is_always_in_the_acl_they_ask_for() -> None:
    assert AclRequest((5,), ()).access_for(1000, 100) == Access(True, (5, 1000), (100,))


@pytest.mark.parametrize("body, expected", [
    ({"allowed_uids": "1000, 1", "allowed_gids": "4"}, AclRequest((1000, 1), (4,))),
    ({"allowed_uids": [3], "allowed_gids": ""}, AclRequest((3,), ())),
    ({}, AclRequest()),
])
def test_acl_bodies_as_shifterimg_sends_them(body: dict[str, object], expected: AclRequest) -> None:
    assert parse_acl(body) == expected


@pytest.mark.parametrize("body, problem", [
    ({"allowed_uids": "alice"}, "allowed_uids must hold numeric ids"),
    ({"allowed_gids": "-4"}, "allowed_gids must hold non-negative ids"),
    ({"allowed_uids": 5}, "allowed_uids must be a comma-separated string"),
])
def test_a_bad_acl_names_the_field(body: dict[str, object], problem: str) -> None:
    with pytest.raises(BadRequest, match=problem):
        parse_acl(body)
