"""The libmunge binding against real munged daemons: identities, every rejection, threads, leaks."""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from imagegw.errors import AuthenticationFailed, ServiceUnavailable
from imagegw.service.munge import decode_credential, encode_credential
from testsupport.munge import MungedStartError, RunningMunged, find_binary

SECRET = "u:p:with:colons"
LOGIN_PAYLOAD = json.dumps({"authorized_locations": {"default": SECRET, "myreg": "bob:pa:ss"}}).encode()


def rss_bytes() -> int:
    """This process's resident set size now (not the peak)."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize(
    ("uid", "gid", "payload"),
    [(1000, 1000, b"hello"), (2000, 4, b"\x00\x01binary\xff"), (0, 0, b"")],
)
def test_decode_returns_the_minting_identity_and_payload(
    munged: RunningMunged, uid: int, gid: int, payload: bytes
) -> None:
    before = int(time.time())
    identity = decode_credential(munged.mint(uid, gid, payload), munged.socket_path)
    assert (identity.uid, identity.gid, identity.payload) == (uid, gid, payload)
    assert before - 1 <= identity.encoded_at <= time.time()
    assert identity.ttl == 300  # munged's default


def test_a_login_payload_with_colons_survives_intact(munged: RunningMunged) -> None:
    identity = decode_credential(munged.mint(1000, 1000, LOGIN_PAYLOAD), munged.socket_path)
    assert identity.payload == LOGIN_PAYLOAD
    assert json.loads(identity.payload)["authorized_locations"]["default"] == SECRET


def test_encode_mints_for_the_calling_process_with_the_requested_ttl(munged: RunningMunged) -> None:
    credential = encode_credential(b"from ctypes", munged.socket_path, ttl=42)
    assert credential.startswith("MUNGE:")
    identity = decode_credential(credential, munged.socket_path)
    assert (identity.uid, identity.gid, identity.payload, identity.ttl) == (
        os.getuid(), os.getgid(), b"from ctypes", 42
    )


def test_surrounding_whitespace_is_ignored(munged: RunningMunged) -> None:
    assert decode_credential(f"  {munged.mint(1000, 1000)}\n", munged.socket_path).uid == 1000


def test_an_expired_credential_is_rejected(munged: RunningMunged) -> None:
    credential = munged.mint(1000, 1000, LOGIN_PAYLOAD, ttl=1)
    time.sleep(2.1)
    with pytest.raises(AuthenticationFailed, match=r"^credential expired$"):
        decode_credential(credential, munged.socket_path)


def test_a_second_decode_is_a_replay(munged: RunningMunged) -> None:
    credential = munged.mint(1000, 1000, LOGIN_PAYLOAD)
    decode_credential(credential, munged.socket_path)
    with pytest.raises(AuthenticationFailed, match=r"^credential replayed$"):
        decode_credential(credential, munged.socket_path)


def tampered(credential: str) -> str:
    """The credential with one base64 character of its body changed."""
    middle = len(credential) // 2
    replacement = "B" if credential[middle] == "A" else "A"
    return credential[:middle] + replacement + credential[middle + 1 :]


@pytest.mark.parametrize(
    "make_credential",
    [
        lambda m: "garbage",
        lambda m: m.mint(1000, 1000)[len("MUNGE:") :],
        lambda m: "MUNGE:not base64!:",
        lambda m: tampered(m.mint(1000, 1000, LOGIN_PAYLOAD)),
        lambda m: m.mint(1000, 1000) + "\0trailing",
        lambda m: "MUNGE:é:",
    ],
    ids=["garbage", "no-prefix", "bad-base64", "tampered", "embedded-nul", "non-ascii"],
)
def test_malformed_credentials_are_invalid(munged: RunningMunged, make_credential) -> None:
    with pytest.raises(AuthenticationFailed, match=r"^credential invalid: "):
        decode_credential(make_credential(munged), munged.socket_path)


def test_a_credential_from_another_munged_is_invalid(munged: RunningMunged, tmp_path: Path) -> None:
    with RunningMunged.start(tmp_path) as other:
        credential = other.mint(1000, 1000, LOGIN_PAYLOAD)
    with pytest.raises(AuthenticationFailed, match=r"^credential invalid: ") as caught:
        decode_credential(credential, munged.socket_path)
    assert SECRET not in str(caught.value)


def test_a_credential_for_another_decoder_is_unauthorized(munged: RunningMunged) -> None:
    credential = munged.mint(1000, 1000, restrict_uid=os.getuid() + 4242)
    with pytest.raises(AuthenticationFailed, match=r"^credential unauthorized: "):
        decode_credential(credential, munged.socket_path)


@pytest.mark.parametrize("credential", ["", "   \n", None, 42, b"MUNGE:bytes:"])
def test_a_missing_credential_is_rejected(munged: RunningMunged, credential: object) -> None:
    with pytest.raises(AuthenticationFailed, match=r"^missing credential$"):
        decode_credential(credential, munged.socket_path)  # type: ignore[arg-type]


def test_a_stopped_munged_is_unavailable_and_named(tmp_path: Path) -> None:
    with RunningMunged.start(tmp_path) as stopped:
        credential = stopped.mint(1000, 1000, LOGIN_PAYLOAD)
    assert not stopped.running
    unreachable = f"^munged is not reachable at {re.escape(stopped.socket_path)}: "
    with pytest.raises(ServiceUnavailable, match=unreachable):
        decode_credential(credential, stopped.socket_path)
    with pytest.raises(ServiceUnavailable, match=re.escape(stopped.socket_path)):
        encode_credential(b"", stopped.socket_path)
    stopped.stop()  # idempotent


def test_a_wrong_socket_is_unavailable_and_named(munged: RunningMunged, tmp_path: Path) -> None:
    wrong = str(tmp_path / "no-munged-here.sock")
    unreachable = f"^munged is not reachable at {re.escape(wrong)}: "
    with pytest.raises(ServiceUnavailable, match=unreachable) as caught:
        decode_credential(munged.mint(1000, 1000, LOGIN_PAYLOAD), wrong)
    assert SECRET not in str(caught.value)


def test_the_payload_never_shows(munged: RunningMunged) -> None:
    identity = decode_credential(munged.mint(1000, 1000, LOGIN_PAYLOAD), munged.socket_path)
    assert SECRET not in repr(identity) and SECRET not in str(identity)
    assert repr(identity) == f"MungeIdentity(uid=1000, gid=1000, encoded_at={identity.encoded_at}, ttl=300)"
    expired = munged.mint(1000, 1000, LOGIN_PAYLOAD, ttl=1)
    replayed = munged.mint(1000, 1000, LOGIN_PAYLOAD)
    decode_credential(replayed, munged.socket_path)
    messages = []
    for credential in (replayed, tampered(munged.mint(1000, 1000, LOGIN_PAYLOAD))):
        with pytest.raises(AuthenticationFailed) as caught:
            decode_credential(credential, munged.socket_path)
        messages.append(str(caught.value))
    time.sleep(2.1)
    with pytest.raises(AuthenticationFailed) as caught:
        decode_credential(expired, munged.socket_path)
    messages.append(str(caught.value))
    assert not [message for message in messages if SECRET in message or "authorized_locations" in message]


def test_concurrent_decodes_from_eight_threads_all_succeed(munged: RunningMunged) -> None:
    payloads = [f"request {n}".encode() for n in range(400)]
    credentials = [encode_credential(payload, munged.socket_path) for payload in payloads]
    with ThreadPoolExecutor(max_workers=8) as pool:
        identities = list(pool.map(lambda c: decode_credential(c, munged.socket_path), credentials))
    assert [identity.payload for identity in identities] == payloads


def test_encoding_and_decoding_do_not_leak(munged: RunningMunged) -> None:
    # 1 KiB payloads: an unfreed buffer per call would grow RSS by ~40 MB over the loop.
    payload = os.urandom(1024)

    def round_trips(count: int) -> None:
        for _ in range(count):
            credential = encode_credential(payload, munged.socket_path)
            assert decode_credential(credential, munged.socket_path).payload == payload

    round_trips(1000)  # let the allocators reach their steady state
    before = rss_bytes()
    round_trips(20_000)
    assert rss_bytes() - before < 5 * 1024 * 1024


def test_a_failed_start_reports_munged_log(tmp_path: Path) -> None:
    key = tmp_path / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o644)  # munged refuses a key others can read
    with pytest.raises(MungedStartError, match=r"(?s)exited with code .*Keyfile is insecure"):
        RunningMunged.start(tmp_path)


def test_a_missing_program_names_the_package() -> None:
    with pytest.raises(MungedStartError, match="apt-get install munge"):
        find_binary("munged-that-does-not-exist")
