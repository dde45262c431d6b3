"""What the REST API does, as plain calls, and who is calling (MUNGE credentials)."""

from imagegw.service.gateway import Gateway, PullLauncher
from imagegw.service.identity import Caller, identify
from imagegw.service.munge import MungeIdentity, decode_credential, encode_credential

__all__ = [
    "Caller",
    "Gateway",
    "MungeIdentity",
    "PullLauncher",
    "decode_credential",
    "encode_credential",
    "identify",
]
