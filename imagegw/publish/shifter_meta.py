"""Shifter's ``.meta`` file: what the runtime reads beside each squashfs.

The runtime (``ImageData.c``) parses ``KEY: value`` lines; ENTRY and CMD must
look like Python list reprs (``['/bin/sh', '-c']``) because that is what its
``is_json_array`` check accepts, so we write them exactly that way.
"""

from __future__ import annotations

from collections.abc import Sequence

from imagegw.access import Access
from imagegw.registry import ResolvedImage


def render_meta(*, env: Sequence[str], entry: Sequence[str] | None, cmd: Sequence[str] | None,
                workdir: str | None, user_acl: Sequence[int] = (), group_acl: Sequence[int] = ()) -> str:
    """The ``.meta`` text for a squashfs image."""
    lines = ["FORMAT: squashfs"]
    if entry:
        lines.append(f"ENTRY: {list(entry)!r}")
    if cmd:
        lines.append(f"CMD: {list(cmd)!r}")
    if workdir:
        lines.append(f"WORKDIR: {workdir}")
    if user_acl:
        lines.append("USERACL: " + ",".join(str(uid) for uid in user_acl))
    if group_acl:
        lines.append("GROUPACL: " + ",".join(str(gid) for gid in group_acl))
    # One line per variable: a value with a newline would start a bogus key.
    lines.extend(f"ENV: {variable}" for variable in env if "\n" not in variable)
    return "\n".join(lines) + "\n"


def image_meta(image: ResolvedImage, access: Access) -> str:
    """The ``.meta`` of a pulled image: its runtime config, and the ACL of a private image."""
    config = image.runtime_config
    return render_meta(env=config.get("Env") or [], entry=config.get("Entrypoint"), cmd=config.get("Cmd"),
                       workdir=config.get("WorkingDir"), user_acl=access.user_acl, group_acl=access.group_acl)
