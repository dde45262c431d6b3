"""Opening a file as another user, so that the kernel, not the gateway, decides what that user may read.

A forked child takes on the user's uid, primary gid and supplementary groups, opens the file and hands
the descriptor back over a socketpair (SCM_RIGHTS). Search permission on every parent directory, POSIX
ACLs, mode bits and security modules then apply exactly as they do to the user's own processes: the
gateway re-implements none of ``access(2)``.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
from collections.abc import Iterable
from typing import NoReturn

from imagegw.errors import Forbidden, ServiceUnavailable

OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
"""Read only; a symbolic link as the last component fails (ELOOP) instead of being followed; a FIFO
opens at once instead of waiting for a writer."""

_REPLY = struct.Struct("ii")
"""The child's answer: how far it got (one of the stages below) and the errno that stopped it; the
descriptor rides along when opened."""
_OPENED, _OPEN_FAILED, _SWITCH_FAILED = 0, 1, 2
_FD = struct.Struct("i")
OPEN_TIMEOUT = 30.0
"""Seconds the child may take to open the file: a hung NFS server would otherwise hold the request, and the
API's thread, forever."""


def open_as(path: str, uid: int, gid: int, groups: Iterable[int]) -> int:
    """Open ``path`` read-only as ``uid`` (primary ``gid``, supplementary ``groups``) would open it.

    Returns a close-on-exec descriptor the caller must close. Raises :class:`OSError` with the errno
    that user's own ``open(2)`` gets, or :class:`Forbidden` when the gateway cannot take on ``uid``:
    only root can, so a gateway running as another user opens files for its own uid only.
    """
    own_uid = os.geteuid()
    if own_uid == 0:
        return _open_in_child(path, uid, gid, sorted(set(groups)))
    if uid == own_uid:
        return os.open(path, OPEN_FLAGS)
    raise Forbidden(f"the gateway runs as uid {own_uid}, not root, so it cannot open files as uid {uid}: "
                    "doimport needs a gateway running as root")


def _open_in_child(path: str, uid: int, gid: int, groups: list[int]) -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        pid = os.fork()
        if pid == 0:
            _become_and_open(theirs, path, uid, gid, groups)
        # Without our copy of the child's end, a child that dies without answering reads as end-of-file.
        theirs.close()
        ours.settimeout(OPEN_TIMEOUT)
        try:
            # Close-on-exec belongs to the descriptor, not to the open file, so it does not travel with
            # SCM_RIGHTS: it is asked for on receipt (socket.recv_fds of 3.11 drops its flags argument).
            answer, ancillary, _flags, _address = ours.recvmsg(_REPLY.size, socket.CMSG_SPACE(_FD.size),
                                                               socket.MSG_CMSG_CLOEXEC)
        except TimeoutError:
            # NFS waits are killable, so the child is gone and reaped below rather than left behind.
            os.kill(pid, signal.SIGKILL)
            raise ServiceUnavailable(f"opening {path} as uid {uid} took more than {OPEN_TIMEOUT:.0f} s: the "
                                     "filesystem holding it does not answer") from None
        finally:
            os.waitpid(pid, 0)
    fds = [_FD.unpack(data[:_FD.size])[0] for level, kind, data in ancillary
           if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and len(data) >= _FD.size]
    return _received(answer, fds, path, uid)


def _become_and_open(channel: socket.socket, path: str, uid: int, gid: int, groups: list[int]) -> NoReturn:
    # The forked child of a threaded server has only this thread: it takes no lock another thread
    # may have held (no logging, no imports) and always leaves through os._exit, never back into
    # the server's code.
    try:
        stage = _SWITCH_FAILED
        # Groups first and uid last: once the uid is the user's, the process may change neither.
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
        stage = _OPEN_FAILED
        fd = os.open(path, OPEN_FLAGS)
        socket.send_fds(channel, [_REPLY.pack(_OPENED, 0)], [fd])
    except OSError as error:
        channel.send(_REPLY.pack(stage, error.errno or 0))
    finally:
        os._exit(0)


def _received(answer: bytes, fds: list[int], path: str, uid: int) -> int:
    if len(answer) != _REPLY.size:
        raise ServiceUnavailable(f"the process opening {path} as uid {uid} ended without an answer")
    stage, number = _REPLY.unpack(answer)
    if stage == _OPENED:
        if not fds:
            raise ServiceUnavailable(f"the process opening {path} as uid {uid} sent no descriptor")
        return fds[0]
    if stage == _SWITCH_FAILED:
        raise Forbidden(f"the gateway cannot take on uid {uid} to open {path}: {os.strerror(number)}")
    raise OSError(number, os.strerror(number), path)
