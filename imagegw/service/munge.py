"""Decode MUNGE credentials (and encode them, for clients and tests) through libmunge.

A request carries a credential minted by ``munge`` on a login node; munged vouches
for the uid/gid that minted it and for the payload inside. We call ``libmunge.so.2``
through ctypes: pymunge never frees libmunge's buffers, and running ``unmunge``
costs a process per request, many times the library call.

Every call creates and destroys its own munge context: a context must not be shared
between threads, and one left over from a failed decode is unfit for the next call.
A credential's payload never appears in a message or a repr.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from imagegw.errors import AuthenticationFailed, ImagegwError, ServiceUnavailable

_LIBRARY = "libmunge.so.2"

# munge_opt_t and munge_err_t values, from munge.h (0.5.15).
_OPT_TTL = 4
_OPT_ENCODE_TIME = 6
_OPT_SOCKET = 8

_SUCCESS = 0
_SNAFU = 1
_NO_MEMORY = 5
_SOCKET = 6
_TIMEOUT = 7
_CRED_EXPIRED = 15
_CRED_REPLAYED = 17
_CRED_UNAUTHORIZED = 18

_UNREACHABLE = frozenset({_SOCKET, _TIMEOUT})
_DAEMON_FAILED = frozenset({_SNAFU, _NO_MEMORY})


@dataclass(frozen=True)
class MungeIdentity:
    """Who minted a valid credential, and what it carries."""

    uid: int
    gid: int
    payload: bytes = field(repr=False)
    """May be empty; may hold secrets (registry passwords), so it is never shown."""
    encoded_at: int
    """Epoch seconds."""
    ttl: int
    """Seconds the credential was valid for after ``encoded_at``."""


class _Context(ctypes.c_void_p):
    """An opaque ``munge_ctx_t``.

    A subclass, so that ctypes hands it back as is rather than as a Python int,
    which the variadic munge_ctx_get/set (no argtypes) would truncate to a C int.
    """


def decode_credential(credential: str, socket_path: str | None = None) -> MungeIdentity:
    """Have munged check ``credential`` and return the identity it proves.

    ``socket_path`` selects munged's socket (libmunge's default otherwise).
    Raises :class:`AuthenticationFailed` for a missing, malformed, forged, expired,
    replayed or unauthorized credential, and :class:`ServiceUnavailable` when munged
    (or libmunge itself) is missing.
    """
    raw = _credential_bytes(credential)
    buf, length = ctypes.c_void_p(), ctypes.c_int()
    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
    with _context(socket_path) as (lib, ctx):
        try:
            code = lib.munge_decode(
                raw, ctx, ctypes.byref(buf), ctypes.byref(length), ctypes.byref(uid), ctypes.byref(gid)
            )
            if code != _SUCCESS:
                raise _decode_error(lib, ctx, code)
            payload = ctypes.string_at(buf.value, length.value) if buf.value else b""
        finally:
            # Expired and replayed credentials come with their payload too: free it always.
            _libc_free()(buf)
        return MungeIdentity(
            uid=uid.value,
            gid=gid.value,
            payload=payload,
            encoded_at=_get(lib, ctx, _OPT_ENCODE_TIME, ctypes.c_int64()),  # a 64-bit time_t
            ttl=_get(lib, ctx, _OPT_TTL, ctypes.c_int()),
        )


def encode_credential(payload: bytes = b"", socket_path: str | None = None, ttl: int | None = None) -> str:
    """Mint a credential for the calling process's uid/gid carrying ``payload``.

    ``ttl`` is in seconds (munged's default, 300, when ``None``). Raises
    :class:`ServiceUnavailable` when munged cannot be reached.
    """
    cred = ctypes.c_void_p()
    with _context(socket_path) as (lib, ctx):
        if ttl is not None:
            _set(lib, ctx, _OPT_TTL, ctypes.c_int(ttl))
        try:
            code = lib.munge_encode(ctypes.byref(cred), ctx, payload, len(payload))
            if code != _SUCCESS:
                raise _service_error(lib, ctx, code) or ImagegwError(
                    f"munge could not encode a credential: {_reason(lib, ctx, code)}"
                )
            if not cred.value:
                raise ImagegwError("munge reported success but returned no credential")
            return ctypes.string_at(cred.value).decode("ascii")
        finally:
            _libc_free()(cred)


def _credential_bytes(credential: object) -> bytes:
    """The credential as the C string libmunge reads, or AuthenticationFailed."""
    if not isinstance(credential, str) or not credential.strip():
        raise AuthenticationFailed("missing credential")
    try:
        raw = credential.strip().encode("ascii")
    except UnicodeEncodeError:
        raise AuthenticationFailed("credential invalid: not ASCII") from None
    # C stops reading at a NUL: whatever follows it would be accepted unchecked.
    if b"\0" in raw:
        raise AuthenticationFailed("credential invalid: contains a NUL byte")
    return raw


@contextmanager
def _context(socket_path: str | None) -> Iterator[tuple[ctypes.CDLL, _Context]]:
    """A fresh munge context aimed at ``socket_path``, destroyed on exit."""
    lib = _libmunge()
    ctx = lib.munge_ctx_create()
    if not ctx.value:
        raise ServiceUnavailable("libmunge could not create a context (out of memory)")
    try:
        if socket_path is not None:
            _set(lib, ctx, _OPT_SOCKET, ctypes.c_char_p(os.fsencode(socket_path)))
        yield lib, ctx
    finally:
        lib.munge_ctx_destroy(ctx)


def _set(lib: ctypes.CDLL, ctx: _Context, option: int, value: ctypes._SimpleCData[Any]) -> None:
    """munge_ctx_set, raising ValueError if munge refuses the value."""
    code = lib.munge_ctx_set(ctx, ctypes.c_int(option), value)
    if code != _SUCCESS:
        raise ValueError(f"munge refused option {option}: {_reason(lib, ctx, code)}")


def _get(lib: ctypes.CDLL, ctx: _Context, option: int, out: ctypes.c_int | ctypes.c_int64) -> int:
    """munge_ctx_get of an integer option into ``out``."""
    code = lib.munge_ctx_get(ctx, ctypes.c_int(option), ctypes.byref(out))
    if code != _SUCCESS:
        raise ImagegwError(f"munge could not read option {option}: {_reason(lib, ctx, code)}")
    return out.value


def _decode_error(lib: ctypes.CDLL, ctx: _Context, code: int) -> ImagegwError:
    """The gateway's error for a failed munge_decode."""
    if code == _CRED_EXPIRED:
        return AuthenticationFailed("credential expired")
    if code == _CRED_REPLAYED:
        return AuthenticationFailed("credential replayed")
    if code == _CRED_UNAUTHORIZED:
        return AuthenticationFailed(f"credential unauthorized: {_reason(lib, ctx, code)}")
    return _service_error(lib, ctx, code) or AuthenticationFailed(
        f"credential invalid: {_reason(lib, ctx, code)}"
    )


def _service_error(lib: ctypes.CDLL, ctx: _Context, code: int) -> ServiceUnavailable | None:
    """ServiceUnavailable naming the socket when ``code`` is munged's fault, not the caller's."""
    if code in _UNREACHABLE:
        state = "is not reachable at"
    elif code in _DAEMON_FAILED:
        state = "failed at"
    else:
        return None
    return ServiceUnavailable(f"munged {state} {_socket(lib, ctx)}: {_reason(lib, ctx, code)}")


def _socket(lib: ctypes.CDLL, ctx: _Context) -> str:
    """The socket the context talks to: the one we set, or libmunge's compiled-in default."""
    path = ctypes.c_char_p()
    if lib.munge_ctx_get(ctx, ctypes.c_int(_OPT_SOCKET), ctypes.byref(path)) != _SUCCESS or not path.value:
        return "(unknown socket)"
    return os.fsdecode(path.value)


def _reason(lib: ctypes.CDLL, ctx: _Context, code: int) -> str:
    """munge's own words for the failure: the context's detailed message, else the code's."""
    message = lib.munge_ctx_strerror(ctx) or lib.munge_strerror(code) or b"unknown error"
    return f"{message.decode(errors='replace')} (munge error {code})"


@functools.cache
def _libmunge() -> ctypes.CDLL:
    """libmunge.so.2 with the C signatures we call, loaded on first use."""
    try:
        lib = ctypes.CDLL(_LIBRARY)
    except OSError as exc:
        raise ServiceUnavailable(f"{_LIBRARY} is not installed (apt-get install libmunge2): {exc}") from exc
    lib.munge_ctx_create.argtypes = []
    lib.munge_ctx_create.restype = _Context
    lib.munge_ctx_destroy.argtypes = [_Context]
    lib.munge_ctx_destroy.restype = None
    lib.munge_ctx_strerror.argtypes = [_Context]
    lib.munge_ctx_strerror.restype = ctypes.c_char_p
    # munge_ctx_set/get are variadic: no argtypes, callers pass ctypes objects.
    lib.munge_ctx_set.restype = ctypes.c_int
    lib.munge_ctx_get.restype = ctypes.c_int
    lib.munge_decode.argtypes = [
        ctypes.c_char_p,
        _Context,
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.POINTER(ctypes.c_uint32),
    ]
    lib.munge_decode.restype = ctypes.c_int
    lib.munge_encode.argtypes = [ctypes.POINTER(ctypes.c_void_p), _Context, ctypes.c_char_p, ctypes.c_int]
    lib.munge_encode.restype = ctypes.c_int
    lib.munge_strerror.argtypes = [ctypes.c_int]
    lib.munge_strerror.restype = ctypes.c_char_p
    return lib


@functools.cache
def _libc_free() -> Callable[[ctypes.c_void_p], None]:
    """libc's free, for the buffers libmunge mallocs (Python's allocator must not touch them)."""
    free = ctypes.CDLL(None).free  # the process's own libc, the one libmunge was linked against
    free.argtypes = [ctypes.c_void_p]
    free.restype = None
    return free
