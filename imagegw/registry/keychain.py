"""Where a pull's registry credential comes from: the first source that has one wins, in imgpkg's order.

0. The request: the login a user sent in their credential's ``authorized_locations``.
1. The environment: ``IMAGEGW_REGISTRY_*`` / ``IMGPKG_REGISTRY_*`` (:mod:`.envcredentials`).
   Then, with ``IMAGEGW_ENABLE_IAAS_AUTH=true``, the cloud's own credentials for AWS ECR, Google's
   registries and Azure ACR (:mod:`.iaas`).
2. Configuration and flags: the ``imagegw pull --registry-*`` flags, then the location's
   ``username`` and ``password`` (or ``passwordFile``, ``passwordEnv``) in ``imagemanager.json``.
3. A docker config: ``$DOCKER_CONFIG/config.json`` or ``~/.docker/config.json``, its credential
   helpers included (:mod:`.dockerconfig`).

No source: anonymous.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from imagegw.registry.credentials import Credential, configured_credential
from imagegw.registry.dockerconfig import DockerConfigCredentials
from imagegw.registry.envcredentials import EnvironmentCredentials
from imagegw.registry.iaas import IaasCredentials
from imagegw.registry.reference import ImageRef

REQUEST = "request"
FLAGS = "flags"


@dataclass(frozen=True)
class HandedCredential:
    """A credential handed to one pull, by its requester (``REQUEST``) or by the CLI's flags (``FLAGS``).

    A flags credential with no secret (``--registry-anon``) means anonymous, whatever the configuration
    or docker config hold.
    """

    credential: Credential
    given_by: str


class Keychain:
    """The credential sources of this host, read once."""

    def __init__(self, environ: Mapping[str, str] | None = None, home: Path | None = None) -> None:
        environ = os.environ if environ is None else environ
        self._environment = EnvironmentCredentials.from_environment(environ)
        self._iaas = IaasCredentials.from_environment(environ)
        self._docker = DockerConfigCredentials.load(environ, Path.home() if home is None else home)

    def credential_for(self, ref: ImageRef, handed: HandedCredential | None = None) -> Credential | None:
        """The credential to pull ``ref`` with (None: anonymous)."""
        if handed is not None and handed.given_by == REQUEST:
            return handed.credential
        from_environment = self._environment.credential_for(ref.location.host, ref.repository)
        if from_environment is not None:
            return from_environment
        from_iaas = self._iaas.credential_for(ref.location) if self._iaas is not None else None
        if from_iaas is not None:
            return from_iaas
        if handed is not None and handed.given_by == FLAGS:
            return handed.credential
        configured = configured_credential(ref.location)
        if configured is not None:
            return configured
        return self._docker.credential_for(ref.location.host) if self._docker is not None else None
