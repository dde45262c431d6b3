"""Who may read an image: the gateway's whole access policy, in one place.

An image is public, or private to the uids and gids in its ACL (Shifter's
``userACL``/``groupACL``). A platform's admins read everything. Bytes that
anyone could pull stay public: only a pull made with the requester's own
registry login can produce a private image, and two private pulls of the same
image share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imagegw.errors import BadRequest


@dataclass(frozen=True)
class Access:
    """Who may read an image: everyone, or (private) the listed uids and gids."""

    private: bool = False
    user_acl: tuple[int, ...] = ()
    group_acl: tuple[int, ...] = ()

    def allows(self, uid: int, gids: frozenset[int], *, admin: bool = False) -> bool:
        """Whether a user (``uid`` in groups ``gids``; an admin of the image's platform if ``admin``) may read it."""
        return admin or not self.private or uid in self.user_acl or not gids.isdisjoint(self.group_acl)

    def covers(self, requested: Access) -> bool:
        """Whether an image with this access already serves a pull that asks for ``requested``."""
        if not requested.private:
            return not self.private
        return self.private and set(requested.user_acl) <= set(self.user_acl) \
            and set(requested.group_acl) <= set(self.group_acl)

    @classmethod
    def of(cls, record: dict[str, Any]) -> Access:
        """The access an image or pull record carries."""
        return cls(bool(record.get("private")), tuple(record.get("userACL") or ()),
                   tuple(record.get("groupACL") or ()))

    def fields(self) -> dict[str, Any]:
        """The record fields that carry this access, in Shifter's spelling."""
        return {"private": self.private, "userACL": list(self.user_acl), "groupACL": list(self.group_acl)}


PUBLIC = Access()


def settle_access(published: Access | None, requested: Access) -> Access:
    """Who may read an image once a pull asking for ``requested`` publishes it.

    ``published`` is the access of the image already READY on the platform, if any. A public
    request, or an image already public, is public; two private pulls' ACLs are joined.
    """
    if not requested.private:
        return PUBLIC
    if published is None:
        return requested
    if not published.private:
        return PUBLIC
    return Access(True, tuple(sorted({*published.user_acl, *requested.user_acl})),
                  tuple(sorted({*published.group_acl, *requested.group_acl})))


@dataclass(frozen=True)
class AclRequest:
    """The uids and gids a pull or import asks to share a private image with."""

    uids: tuple[int, ...] = ()
    gids: tuple[int, ...] = ()

    def access_for(self, uid: int, gid: int) -> Access:
        """A private access for these ids plus the requester's (Shifter adds the requester too)."""
        return Access(True, tuple(sorted({*self.uids, uid})), tuple(sorted({*self.gids, gid})))


def parse_acl(body: dict[str, Any]) -> AclRequest:
    """``{"allowed_uids": "1000,1", "allowed_gids": "4"}`` (strings as shifterimg sends, or lists)."""
    return AclRequest(_ids(body.get("allowed_uids"), "allowed_uids"), _ids(body.get("allowed_gids"), "allowed_gids"))


def _ids(value: Any, name: str) -> tuple[int, ...]:
    if value is None or value == "":
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise BadRequest(f"{name} must be a comma-separated string of numbers, not {value!r}")
    try:
        ids = tuple(int(str(item).strip()) for item in items if str(item).strip())
    except ValueError:
        raise BadRequest(f"{name} must hold numeric ids, not {value!r}") from None
    if any(number < 0 for number in ids):
        raise BadRequest(f"{name} must hold non-negative ids, not {value!r}")
    return ids
