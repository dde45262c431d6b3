"""What the REST API does, as plain calls, and who is calling (MUNGE credentials)."""

from imagegw.service.gateway import Gateway
from imagegw.service.identity import Caller, identify
from imagegw.service.launch import PullLauncher, StartedPull, start_pull
from imagegw.service.munge import MungeIdentity, decode_credential, encode_credential

__all__ = [
    "Caller",
    "Gateway",
    "MungeIdentity",
    "PullLauncher",
    "StartedPull",
    "decode_credential",
    "encode_credential",
    "identify",
    "start_pull",
]
