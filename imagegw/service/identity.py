"""Who is calling: the uid/gid a MUNGE credential vouches for, named by the gateway host's user database."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass, field
from functools import cached_property

from imagegw.access import Access
from imagegw.config import Location, Platform
from imagegw.registry import RegistryLogin, login_for, parse_authorized_locations
from imagegw.service.munge import MungeIdentity


@dataclass(frozen=True)
class Caller:
    """An authenticated user of the gateway.

    Their name and groups are asked of the host's user database (NSS: files, or LDAP through sssd) the
    first time something needs them, not for every request: a lookup of a public image, most of a site's
    calls, needs neither, and the two calls cost a twentieth of a lookup's CPU with plain files.
    """

    uid: int
    gid: int
    logins: dict[str, RegistryLogin] = field(default_factory=dict, repr=False)

    @cached_property
    def user(self) -> str | None:
        """The name of ``uid`` on the gateway host, if it has one."""
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return None

    @cached_property
    def groups(self) -> frozenset[int]:
        """The primary gid and, for known users, every group the host lists them in."""
        if self.user is None:
            return frozenset({self.gid})
        return frozenset({self.gid, *os.getgrouplist(self.user, self.gid)})

    def is_admin(self, platform: Platform) -> bool:
        return self.user is not None and self.user in platform.admins

    def may_read(self, access: Access, platform: Platform) -> bool:
        """Whether this caller may read an image of ``platform`` with ``access``."""
        # Anyone may read a public image: who the caller is matters only for a private one.
        return not access.private or access.allows(self.uid, self.groups, admin=self.is_admin(platform))

    def login_for(self, location: Location, default_location: str) -> RegistryLogin | None:
        """The registry login this caller sent for ``location`` (see :func:`imagegw.registry.login_for`)."""
        return login_for(self.logins, location, default_location)


def identify(identity: MungeIdentity) -> Caller:
    """The caller a decoded credential stands for, with the registry logins in its payload."""
    return Caller(uid=identity.uid, gid=identity.gid, logins=parse_authorized_locations(identity.payload))
