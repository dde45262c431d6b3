"""Who is calling: the uid/gid a MUNGE credential vouches for, named by the gateway host's user database."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass, field

from imagegw.access import Access
from imagegw.config import Location, Platform
from imagegw.registry import RegistryLogin, login_for, parse_authorized_locations
from imagegw.service.munge import MungeIdentity


@dataclass(frozen=True)
class Caller:
    """An authenticated user of the gateway."""

    uid: int
    gid: int
    user: str | None
    """The name of ``uid`` on the gateway host, if it has one."""
    groups: frozenset[int]
    """The primary gid and, for known users, every group the host lists them in."""
    logins: dict[str, RegistryLogin] = field(default_factory=dict, repr=False)

    def is_admin(self, platform: Platform) -> bool:
        return self.user is not None and self.user in platform.admins

    def may_read(self, access: Access, platform: Platform) -> bool:
        """Whether this caller may read an image of ``platform`` with ``access``."""
        return access.allows(self.uid, self.groups, admin=self.is_admin(platform))

    def login_for(self, location: Location, default_location: str) -> RegistryLogin | None:
        """The registry login this caller sent for ``location`` (see :func:`imagegw.registry.login_for`)."""
        return login_for(self.logins, location, default_location)


def identify(identity: MungeIdentity) -> Caller:
    """The caller a decoded credential stands for, with the registry logins in its payload."""
    user = _user_name(identity.uid)
    groups = {identity.gid}
    if user is not None:
        groups.update(os.getgrouplist(user, identity.gid))
    return Caller(uid=identity.uid, gid=identity.gid, user=user, groups=frozenset(groups),
                  logins=parse_authorized_locations(identity.payload))


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None
