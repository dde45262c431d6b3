"""Who may read a private image, as the host's user database names the caller: real users and groups."""

from __future__ import annotations

from pathlib import Path

from imagegw.access import Access
from imagegw.config import Platform
from imagegw.service.identity import Caller
from tests.user_fixtures import People

PLATFORM = Platform(name="cluster", image_dir=Path("/images"), admins=("root",))


def test_a_supplementary_group_reads_an_image_private_to_that_group(people: People) -> None:
    team_only = Access(True, (), (people.team,))
    member = Caller(uid=people.caller.uid, gid=people.caller.gid)
    outsider = Caller(uid=people.outsider.uid, gid=people.outsider.gid)
    assert member.user == people.caller.name
    assert member.may_read(team_only, PLATFORM)
    assert not outsider.may_read(team_only, PLATFORM)
    assert outsider.may_read(Access(False, (), ()), PLATFORM)


def test_a_platform_admin_is_known_by_name_and_a_uid_without_one_has_only_its_own_gid() -> None:
    private = Access(True, (12345,), ())
    assert Caller(uid=0, gid=0).may_read(private, PLATFORM)
    unnamed = Caller(uid=4_000_000_000 - 7, gid=4_000_000_000 - 7)
    assert unnamed.user is None
    assert unnamed.groups == frozenset({4_000_000_000 - 7})
    assert not unnamed.may_read(private, PLATFORM)
