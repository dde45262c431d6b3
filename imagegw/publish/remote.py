"""Publishing into a remote platform's image directory over SFTP (``accesstype: remote``).

The gateway often sits outside a cluster's firewall: it reaches a login or service node over
SSH and writes into the cluster's global filesystem from there. The first configured host that
answers and accepts the gateway is used, and its connection serves every call until the
publisher is closed (one connection per pull). Host keys are checked against a known-hosts
file; an unknown or changed key is refused, naming the host and the key's fingerprint.

Each file is written under a hidden temporary name in the image directory (mode 0600 before
any byte arrives), its size and SHA-256 checked on the remote side, and renamed into place,
the squashfs before the ``.meta``; a failure removes the temporary file when the connection
still allows it, and a retry with the same publisher removes what a broken connection left.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import logging
import os
import posixpath
import shlex
import socket
import stat
import uuid
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import paramiko

from imagegw.disk import disk_errors, full_disk_likely
from imagegw.errors import RemoteAccessRefused, StorageError, TransferError
from imagegw.publish.publisher import IMAGE_FILE_MODE, PublishedImage
from imagegw.sshconfig import RemoteAccess, SshHost

_CHUNK = 1 << 20
# paramiko's defaults (a 2 MiB window, 32 KiB write requests) leave a fast link idle while it
# waits for window adjustments and answers; with a large window, requests as large as OpenSSH's
# sftp-server takes (messages up to 256 KiB) and AES-GCM (no separate MAC to compute), a copy
# runs about as fast as scp's (bench/README.md).
_WINDOW_SIZE = 64 << 20
_WRITE_REQUEST = 255 << 10
_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr")
_KEEPALIVE = 30
_COMMAND_NOT_FOUND = 127

# paramiko logs a failed connection with a traceback; each failure reaches the operator as this
# module's error naming the host and the reason, so its own log would only repeat it, noisily.
logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)


@dataclass
class _Session:
    host: SshHost
    client: paramiko.SSHClient
    sftp: paramiko.SFTPClient


class RemotePublisher:
    """Publishes images into an image directory on a remote platform's hosts, over one SSH connection."""

    def __init__(self, access: RemoteAccess, image_dir: Path) -> None:
        self.access = access
        self.image_dir = posixpath.normpath(str(image_dir))
        self._session: _Session | None = None
        self._partials: set[str] = set()
        """Temporary files of ours that a broken connection may have left; removed on the next connect."""

    def __str__(self) -> str:
        host = self._session.host if self._session else self.access.hosts[0]
        return f"{host}:{self.image_dir}"

    def __enter__(self) -> RemotePublisher:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection, if one is open (the next call opens a new one)."""
        if self._session is not None:
            self._session.client.close()
            self._session = None

    def paths(self, image_id: str) -> tuple[str, str]:
        """Where an image's squashfs and ``.meta`` live on the remote hosts."""
        return (posixpath.join(self.image_dir, f"{image_id}.squashfs"),
                posixpath.join(self.image_dir, f"{image_id}.meta"))

    def is_published(self, image_id: str) -> bool:
        """Whether both of an image's files are in place on the remote side."""
        with self._operation(f"checking image {image_id}") as sftp:
            for path in self.paths(image_id):
                try:
                    if not stat.S_ISREG(sftp.stat(path).st_mode or 0):
                        return False
                except FileNotFoundError:
                    return False
            return True

    def publish(self, squashfs: Path | None, meta_text: str, image_id: str) -> PublishedImage:
        """Copy a built squashfs and write its ``.meta`` into the remote image directory, each verified
        and renamed into place; without a squashfs, only the ``.meta`` is rewritten."""
        target, meta_target = self.paths(image_id)
        with ExitStack() as files:
            source = None
            if squashfs is not None:  # opened first: a local failure is not the remote side's
                with disk_errors(squashfs, f"reading the squashfs of image {image_id}"):
                    source = files.enter_context(open(squashfs, "rb"))
            with self._operation(f"publishing image {image_id}") as sftp:
                if source is not None:
                    self._place(sftp, source, target)
                self._place(sftp, io.BytesIO(meta_text.encode()), meta_target)
                size = sftp.stat(target).st_size or 0
        return PublishedImage(squashfs=Path(target), meta=Path(meta_target), size=size)

    def free_bytes(self) -> int | None:
        """Bytes free now in the remote image directory's filesystem (None: ``df`` cannot tell)."""
        with self._operation("checking the free space"):
            return self._free_bytes()

    def unpublish(self, image_id: str) -> None:
        """Remove an image's files from the remote image directory (the ``.meta`` first)."""
        with self._operation(f"removing image {image_id}") as sftp:
            for path in reversed(self.paths(image_id)):
                try:
                    sftp.remove(path)
                except FileNotFoundError:
                    pass

    # -- one file, atomically ---------------------------------------------------------------------

    def _place(self, sftp: paramiko.SFTPClient, source: BinaryIO, target: str) -> None:
        temporary = posixpath.join(self.image_dir, f".{posixpath.basename(target)}.{uuid.uuid4().hex}.partial")
        self._partials.add(temporary)
        try:
            digest, size = self._write(sftp, source, temporary)
            self._verify(sftp, temporary, digest, size)
            sftp.posix_rename(temporary, target)
        except BaseException:
            # Forgotten only once surely gone: a connection that broke a moment ago can still look
            # alive, and its removal then fails, which leaves the file to the next connection.
            if _removed(sftp, temporary):
                self._partials.discard(temporary)
            raise
        self._partials.discard(temporary)

    @staticmethod
    def _write(sftp: paramiko.SFTPClient, source: BinaryIO, temporary: str) -> tuple[str, int]:
        digest = hashlib.sha256()
        size = 0
        # Each chunk is hashed in another thread while it is encrypted and sent (hashlib lets go
        # of the interpreter lock), so the digest costs the copy next to nothing.
        with sftp.open(temporary, "wb") as remote, ThreadPoolExecutor(1, "sha256") as hasher:
            sftp.chmod(temporary, IMAGE_FILE_MODE)  # before any byte: a private image is never readable
            # Pipelined: writes are sent without waiting for each one's answer; errors come at close.
            remote.set_pipelined(True)
            remote.MAX_REQUEST_SIZE = _WRITE_REQUEST  # paramiko's per-request cap, a class attribute
            hashing: Future[None] | None = None
            while chunk := source.read(_CHUNK):
                if hashing is not None:
                    hashing.result()
                hashing = hasher.submit(digest.update, chunk)
                remote.write(chunk)
                size += len(chunk)
            if hashing is not None:
                hashing.result()
        return digest.hexdigest(), size

    def _verify(self, sftp: paramiko.SFTPClient, path: str, digest: str, size: int) -> None:
        """The remote file has the bytes we sent: its size, and its SHA-256 computed over there
        (a small file, such as a ``.meta``, is read back instead: cheaper than a remote command)."""
        remote_size = sftp.stat(path).st_size
        if remote_size != size:
            # Pipelined writes that the server failed are not always reported at close: a short
            # file is how a full disk shows, so it is judged as a refused write.
            raise OSError(errno.EIO, f"the copy holds {remote_size} of {size} bytes")
        remote_digest = self._read_back_sha256(sftp, path) if size <= _CHUNK else self._remote_sha256(sftp, path)
        if remote_digest != digest:
            raise TransferError(f"{self}: {path} has SHA-256 {remote_digest} after the copy, not {digest}")

    def _remote_sha256(self, sftp: paramiko.SFTPClient, path: str) -> str:
        """The file's SHA-256 computed on the remote host: by OpenSSL (which uses the CPU's SHA
        instructions, unlike coreutils' sha256sum) or sha256sum; where it has neither, read back."""
        quoted = shlex.quote(path)
        status, output = self._run(f"openssl dgst -sha256 -r {quoted} 2>/dev/null || sha256sum -- {quoted}")
        if status == 0:
            return output.split(maxsplit=1)[0]
        if status != _COMMAND_NOT_FOUND:
            raise TransferError(f"{self}: hashing {path} failed (exit status {status}): {output.strip()}")
        return self._read_back_sha256(sftp, path)

    @staticmethod
    def _read_back_sha256(sftp: paramiko.SFTPClient, path: str) -> str:
        digest = hashlib.sha256()
        with sftp.open(path, "rb") as remote:
            remote.prefetch()
            while chunk := remote.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()

    def _run(self, command: str) -> tuple[int, str]:
        """Run ``command`` on the connected host: (exit status, its output and error output)."""
        assert self._session is not None  # only called inside an operation
        channel = self._session.client.get_transport().open_session()  # type: ignore[union-attr]
        try:
            channel.settimeout(self.access.timeout)
            channel.set_combine_stderr(True)
            channel.exec_command(command)
            output = b"".join(iter(lambda: channel.recv(65536), b""))
            return channel.recv_exit_status(), output.decode("utf-8", "replace")
        finally:
            channel.close()

    # -- connections and errors -------------------------------------------------------------------

    @contextmanager
    def _operation(self, doing: str) -> Iterator[paramiko.SFTPClient]:
        """The SFTP session for one call, its failures in the gateway's vocabulary. A broken connection
        is dropped (a TransferError, retried with a new one); a refusal by the server is a StorageError."""
        session = self._connect()
        try:
            yield session.sftp
        except (TransferError, StorageError, RemoteAccessRefused):
            raise
        except (OSError, EOFError, paramiko.SSHException) as exc:
            # An SFTP server refuses with a status, never by ending the channel: an EOF is a broken
            # connection even while the transport does not know it yet (seen once in CI).
            if isinstance(exc, EOFError) or not self._connected():
                self.close()
                raise TransferError(f"{self}: the connection to {session.host} broke while {doing}: "
                                    f"{_reason(exc)}") from None
            raise self._refused_write(exc, doing) from None

    def _refused_write(self, error: BaseException, doing: str) -> StorageError:
        """The server refused an SFTP call: say why, and say so plainly when its disk is full."""
        reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
        # SFTP version 3, which OpenSSH speaks, has no error code for a full disk.
        if full_disk_likely(self._free_bytes()):
            reason = "No space left on device"
        return StorageError(f"{self}: {reason} ({doing})")

    def _free_bytes(self) -> int | None:
        """Bytes free in the remote image directory's filesystem, by ``df``; None if it cannot tell."""
        try:
            status, output = self._run(f"df -Pk -- {shlex.quote(self.image_dir)}")
            return int(output.splitlines()[-1].split()[3]) * 1024 if status == 0 else None
        except (OSError, EOFError, paramiko.SSHException, ValueError, IndexError):
            return None

    def _connected(self) -> bool:
        if self._session is None:
            return False
        transport = self._session.client.get_transport()
        return transport is not None and transport.is_active()

    def _connect(self) -> _Session:
        """The open session, or a new one to the first host that answers and accepts us."""
        if self._connected():
            assert self._session is not None
            return self._session
        self.close()
        failures: list[str] = []
        refused = False
        for host in self.access.hosts:
            try:
                self._session = self._open(host)
            except RemoteAccessRefused as exc:
                failures.append(str(exc))
                refused = True
            except TransferError as exc:
                failures.append(str(exc))
            else:
                self._remove_partials()
                return self._session
        tried = "; ".join(failures)
        if refused:
            raise RemoteAccessRefused(f"no host of {self.image_dir} accepted the gateway: {tried}")
        raise TransferError(f"no host of {self.image_dir} could be reached: {tried}")

    def _open(self, host: SshHost) -> _Session:
        access = self.access
        if access.key is not None and not os.access(access.key, os.R_OK):
            raise RemoteAccessRefused(f"{host}: the key {access.key} (ssh.key) cannot be read on this host")
        client = paramiko.SSHClient()
        if access.check_host_keys:
            if access.known_hosts.is_file():
                client.load_host_keys(str(access.known_hosts))
            client.set_missing_host_key_policy(_RefuseUnknown(host, access.known_hosts))
        else:
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # remembered for this connection only
        try:
            client.connect(host.name, host.port, username=access.username,
                           key_filename=str(access.key) if access.key else None, passphrase=access.key_passphrase,
                           timeout=access.connect_timeout, banner_timeout=access.connect_timeout,
                           auth_timeout=access.connect_timeout, channel_timeout=access.timeout,
                           allow_agent=False, look_for_keys=access.key is None,
                           # types-paramiko still describes paramiko 3's factory (with GSS arguments).
                           transport_factory=_transport)  # type: ignore[arg-type]
            transport = client.get_transport()
            assert transport is not None  # connect() succeeded
            transport.set_keepalive(_KEEPALIVE)
            sftp = paramiko.SFTPClient.from_transport(transport, window_size=_WINDOW_SIZE)
            assert sftp is not None
            sftp.get_channel().settimeout(access.timeout)  # type: ignore[union-attr]
        except BaseException as exc:
            client.close()
            raise _connect_error(host, access, exc) from None
        return _Session(host, client, sftp)

    def _remove_partials(self) -> None:
        """A new connection first removes what an earlier, broken one left under temporary names."""
        assert self._session is not None
        self._partials = {partial for partial in self._partials if not _removed(self._session.sftp, partial)}


def _transport(sock: socket.socket, disabled_algorithms: Mapping[str, Iterable[str]] | None = None
               ) -> paramiko.Transport:
    """paramiko's transport, preferring the ciphers in ``_CIPHERS``."""
    transport = paramiko.Transport(sock, disabled_algorithms=disabled_algorithms)
    transport.get_security_options().ciphers = _CIPHERS
    return transport


class _RefuseUnknown(paramiko.MissingHostKeyPolicy):
    def __init__(self, host: SshHost, known_hosts: Path) -> None:
        self._host = host
        self._known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        scan = f"ssh-keyscan{'' if self._host.port == 22 else f' -p {self._host.port}'} {self._host.name}"
        raise RemoteAccessRefused(
            f"{self._host}: unknown host key {key.get_name()} {fingerprint(key)}, not in {self._known_hosts}; "
            f"if it is the host's, add it ({scan} >> {self._known_hosts})")


def fingerprint(key: paramiko.PKey) -> str:
    """A key's fingerprint as OpenSSH shows it: ``SHA256:`` and unpadded base64."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def _connect_error(host: SshHost, access: RemoteAccess, error: BaseException) -> BaseException:
    """The gateway's error for a failed connection to ``host``: refused for good, or worth another host."""
    if isinstance(error, RemoteAccessRefused):
        return error
    if isinstance(error, paramiko.BadHostKeyException):
        return RemoteAccessRefused(
            f"{host}: host key changed: it offers {error.key.get_name()} {fingerprint(error.key)}, "
            f"{access.known_hosts} holds {fingerprint(error.expected_key)}; refusing it (a reinstalled host, "
            "or someone in between)")
    if isinstance(error, paramiko.PasswordRequiredException):
        return RemoteAccessRefused(f"{host}: the key {access.key} is encrypted: set ssh.keyPassphrase or "
                                   "ssh.keyPassphraseEnv")
    if isinstance(error, paramiko.AuthenticationException):
        return RemoteAccessRefused(f"{host}: {access.username} was not let in with the key "
                                   f"{access.key or '(from ~/.ssh)'}: {error}")
    if isinstance(error, OSError | EOFError | paramiko.SSHException):
        return TransferError(f"{host}: {_reason(error, access.connect_timeout)}")
    return error


def _reason(error: BaseException, timeout: float | None = None) -> str:
    if isinstance(error, paramiko.ssh_exception.NoValidConnectionsError):
        return "connection refused"
    if isinstance(error, socket.timeout | TimeoutError):
        return f"no answer within {timeout:g} s" if timeout else "timed out"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, EOFError):
        return "the connection was closed"
    if isinstance(error, paramiko.SSHException):
        return f"SSH failed: {error}"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def _removed(sftp: paramiko.SFTPClient, path: str) -> bool:
    """Remove ``path`` if it is there: whether it is gone now (not when the connection broke first)."""
    try:
        sftp.remove(path)
    except FileNotFoundError:
        return True
    except (OSError, EOFError, paramiko.SSHException):
        return False
    return True

