"""A private certificate authority and a server certificate it signed for 127.0.0.1, made with openssl."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class PrivateCa:
    """The CA's certificate (what clients must be told to trust) and the server's certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_private_ca(directory: Path) -> PrivateCa:
    """A CA and a 127.0.0.1 server certificate under ``directory``, valid for a day."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = directory / "ca.crt", directory / "ca.key"
    server_cert, server_key, request = directory / "server.crt", directory / "server.key", directory / "server.csr"
    extensions = directory / "server.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _openssl("req", "-x509", *_EC, "-days", "1", "-subj", "/CN=imagegw test CA", "-keyout", ca_key, "-out", ca_cert,
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    _openssl("req", *_EC, "-subj", "/CN=127.0.0.1", "-keyout", server_key, "-out", request)
    _openssl("x509", "-req", "-in", request, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial", "-days", "1",
             "-extfile", extensions, "-out", server_cert)
    return PrivateCa(ca_cert, server_cert, server_key)


def _openssl(*arguments: str | Path) -> None:
    subprocess.run(["openssl", *map(str, arguments)], check=True, capture_output=True)
