"""Cloud credentials (IMAGEGW_ENABLE_IAAS_AUTH): each provider through its SDK, against a loopback emulation."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagegw.config import Location, load_settings
from imagegw.errors import ConfigError, RegistryUnauthorized
from imagegw.registry import Credential, ImageRef, PlatformSpec, RegistryClient
from imagegw.registry.iaas import ACR_USERNAME, GCP_USERNAME, IaasCredentials, provider_for
from imagegw.registry.keychain import FLAGS, HandedCredential, Keychain
from tests.iaas_fixtures import AWS_SECRET, ECR_PASSWORD
from testsupport.iaas import AcrRegistry, AzureIdentity, EcrApi, GceMetadata, jwt_shaped
from testsupport.images import LayerBuilder, push_image
from testsupport.registry import RunningRegistry

ON = {"IMAGEGW_ENABLE_IAAS_AUTH": "true"}
ECR_HOST = "123456789012.dkr.ecr.eu-west-3.amazonaws.com"
_AZURE_VARIABLES = ("AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID", "AZURE_USERNAME",
                    "AZURE_CLIENT_CERTIFICATE_PATH", "AZURE_FEDERATED_TOKEN_FILE", "MSI_ENDPOINT", "MSI_SECRET",
                    "IMDS_ENDPOINT", "IDENTITY_SERVER_THUMBPRINT", "AZURE_TOKEN_CREDENTIALS")


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def gce(monkeypatch: pytest.MonkeyPatch) -> Iterator[GceMetadata]:
    with GceMetadata() as metadata:
        monkeypatch.setenv("GCE_METADATA_HOST", metadata.host)
        yield metadata


@pytest.fixture
def aad(monkeypatch: pytest.MonkeyPatch) -> Iterator[AzureIdentity]:
    """The managed identity emulation, the only Azure credential in the environment."""
    with AzureIdentity() as identity:
        for variable in _AZURE_VARIABLES:
            monkeypatch.delenv(variable, raising=False)
        for variable, value in identity.environment.items():
            monkeypatch.setenv(variable, value)
        yield identity


@pytest.fixture
def acr(aad: AzureIdentity) -> Iterator[AcrRegistry]:
    """An ACR exchange whose refresh tokens are JWTs valid ten minutes."""
    with AcrRegistry(aad, lambda: jwt_shaped(time.time() + 600)) as registry:
        yield registry


@pytest.fixture
def opaque_acr(aad: AzureIdentity) -> Iterator[AcrRegistry]:
    """An ACR exchange whose refresh tokens are opaque, as the test token server's are."""
    with AcrRegistry(aad, lambda: f"opaque-{time.monotonic_ns()}") as registry:
        yield registry


def alias(emulation: EcrApi | GceMetadata | AcrRegistry, provider: str) -> Location:
    """A location naming its cloud, on a loopback host (as a site's alias or private endpoint would be)."""
    return Location(name=f"{provider}-alias", url=emulation.url, iaas=provider)


# -- turning it on, and which registries it is for --------------------------------------------------------


@pytest.mark.parametrize("value, on", [("true", True), ("TRUE", True), ("1", True), ("false", False), ("0", False),
                                       ("", False)])
def test_off_unless_opted_in(value: str, on: bool) -> None:
    assert IaasCredentials.from_environment({}) is None
    assert (IaasCredentials.from_environment({"IMAGEGW_ENABLE_IAAS_AUTH": value}) is not None) == on


def test_a_bad_opt_in_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="IMAGEGW_ENABLE_IAAS_AUTH in the environment: 'yes please'"):
        IaasCredentials.from_environment({"IMAGEGW_ENABLE_IAAS_AUTH": "yes please"})


@pytest.mark.parametrize("host, provider", [
    (ECR_HOST, "ecr"),
    ("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn", "ecr"),
    ("123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com", "ecr"),
    ("gcr.io", "gcp"), ("EU.gcr.io", "gcp"), ("europe-west1-docker.pkg.dev", "gcp"),
    ("myregistry.azurecr.io", "acr"),
    ("docker.io", None), ("a.b.gcr.io", None), ("docker.pkg.dev", None), ("gcr.io:5000", None),
    ("myregistry.azurecr.io.example.com", None), ("dkr.ecr.us-east-1.amazonaws.com", None),
])
def test_the_provider_is_told_by_the_host(host: str, provider: str | None) -> None:
    assert provider_for(host) == provider


def test_other_registries_get_nothing_from_it() -> None:
    assert IaasCredentials().credential_for(Location(name="site", url="https://reg.site.example")) is None


def location_settings(tmp_path: Path, iaas: str) -> Location:
    config = {"Platforms": {"p": {"local": {"imageDir": str(tmp_path)}}},
              "Locations": {"alias": {"url": "https://registry.site.example", "iaas": iaas}}}
    (tmp_path / "imagemanager.json").write_text(json.dumps(config))
    return load_settings(tmp_path / "imagemanager.json").locations["alias"]


def test_a_location_may_name_its_cloud(tmp_path: Path) -> None:
    assert location_settings(tmp_path, "ecr").iaas == "ecr"
    with pytest.raises(ConfigError, match="Locations.alias.iaas in .*: 'aws' must be one of 'ecr', 'gcp', 'acr'"):
        location_settings(tmp_path, "aws")


# -- each provider, through its SDK --------------------------------------------------------------------


def test_ecr_token_from_the_region_the_host_names(ecr: EcrApi) -> None:
    credential = IaasCredentials().credential_for(Location(name="ecr", url=f"https://{ECR_HOST}"))

    assert credential == Credential("IaaS: AWS ECR (region eu-west-3)", username="AWS", password=ECR_PASSWORD)
    assert ecr.regions == ["eu-west-3"]


def test_ecr_alias_uses_the_configured_region(ecr: EcrApi) -> None:
    credential = IaasCredentials().credential_for(alias(ecr, "ecr"))

    assert credential is not None and credential.source == "IaaS: AWS ECR (region us-east-2)"
    assert ecr.regions == ["us-east-2"]


def test_gcp_token_from_the_metadata_server(gce: GceMetadata) -> None:
    credential = IaasCredentials().credential_for(Location(name="gcr", url="https://europe-west1-docker.pkg.dev"))

    assert credential == Credential("IaaS: GCP metadata server", username=GCP_USERNAME, password=gce.issued[0])


def test_acr_refresh_token_for_an_azure_ad_token(aad: AzureIdentity, acr: AcrRegistry) -> None:
    credential = IaasCredentials().credential_for(alias(acr, "acr"))

    assert credential == Credential(f"IaaS: Azure AD exchanged at {acr.host}", username=ACR_USERNAME,
                                    identity_token=acr.issued[0])
    assert aad.requests[0].query["resource"] == "https://management.azure.com"


def test_acr_refresh_token_is_kept_until_it_expires(aad: AzureIdentity, acr: AcrRegistry) -> None:
    clock = Clock()
    credentials = IaasCredentials(clock)
    first = credentials.credential_for(alias(acr, "acr"))
    clock.now += 200
    assert credentials.credential_for(alias(acr, "acr")) == first
    clock.now += 200  # the JWT's ten minutes, less the renewal margin, are up: the AAD token's hour is not
    assert credentials.credential_for(alias(acr, "acr")) != first
    assert len(acr.requests) == 2


@pytest.mark.parametrize("emulation, provider, lifetime", [("ecr", "ecr", 43200), ("gce", "gcp", 3599),
                                                           ("opaque_acr", "acr", 3600)])
def test_credentials_are_kept_until_shortly_before_they_expire(request: pytest.FixtureRequest, emulation: str,
                                                               provider: str, lifetime: int) -> None:
    """ACR refresh tokens that are no JWTs are kept as long as the Azure AD token they came from."""
    served: EcrApi | GceMetadata | AcrRegistry = request.getfixturevalue(emulation)
    clock = Clock()
    credentials = IaasCredentials(clock)
    credentials.credential_for(alias(served, provider))
    clock.now += lifetime - 600
    credentials.credential_for(alias(served, provider))
    assert len(served.requests) == 1
    clock.now += 600
    credentials.credential_for(alias(served, provider))
    assert len(served.requests) == 2


@pytest.mark.parametrize("module, extra", [("boto3", "ecr"), ("azure.identity", "acr")])
def test_a_missing_sdk_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch, module: str, extra: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what an uninstalled package looks like to an import
    location = Location(name="alias", url="http://127.0.0.1:9", iaas=extra)
    with pytest.raises(ConfigError, match=rf"pip install 'imagegw\[{extra}\]'"):
        IaasCredentials().credential_for(location)


# -- refusals ------------------------------------------------------------------------------------------


def refusal(location: Location, credentials: IaasCredentials | None = None) -> str:
    with pytest.raises(RegistryUnauthorized) as refused:
        (credentials or IaasCredentials()).credential_for(location)
    return str(refused.value)


def test_no_aws_credentials(ecr: EcrApi, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    message = refusal(Location(name="ecr", url=f"https://{ECR_HOST}"))
    assert message == (f"IaaS: AWS ECR (region eu-west-3) gave no credential for registry {ECR_HOST}: "
                       f"Unable to locate credentials")


def test_ecr_refusal(ecr: EcrApi) -> None:
    ecr.refusal = 400
    message = refusal(alias(ecr, "ecr"))
    assert message.startswith(f"IaaS: AWS ECR (region us-east-2) gave no credential for registry {ecr.host}: ")
    assert "UnrecognizedClientException" in message and AWS_SECRET not in message


def test_metadata_server_unreachable(gce: GceMetadata, monkeypatch: pytest.MonkeyPatch) -> None:
    gce.stop()
    message = refusal(Location(name="gcr", url="https://gcr.io"))
    assert message == (f"IaaS: GCP metadata server gave no credential for registry gcr.io: {gce.host} is "
                       f"unreachable (ConnectionError)")


def test_metadata_server_refusal(gce: GceMetadata) -> None:
    gce.refusal = 404
    message = refusal(alias(gce, "gcp"))
    assert message == (f"IaaS: GCP metadata server gave no credential for registry {gce.host}: "
                       f"{gce.host} answered HTTP 404")


def test_azure_ad_refusal(aad: AzureIdentity, acr: AcrRegistry) -> None:
    aad.refusal = 400
    message = refusal(alias(acr, "acr"))
    assert message.startswith(f"IaaS: Azure AD gave no credential for registry {acr.host}: ")
    assert "ManagedIdentityCredential" in message and aad.header not in message


def test_exchange_refusal_shows_no_token(aad: AzureIdentity, acr: AcrRegistry) -> None:
    acr.refusal = 401
    message = refusal(alias(acr, "acr"))
    assert message == (f"IaaS: Azure AD token exchange at {acr.url}/oauth2/exchange gave no credential for "
                       f"registry {acr.host}: HTTP 401")
    assert aad.issued and aad.issued[0] not in message


# -- in the keychain, and through real registries ----------------------------------------------------------


def test_iaas_comes_after_the_environment_and_before_flags(gce: GceMetadata, tmp_path: Path) -> None:
    location = alias(gce, "gcp")
    environment = {"IMAGEGW_REGISTRY_HOSTNAME": gce.host, "IMAGEGW_REGISTRY_USERNAME": "env-user",
                   "IMAGEGW_REGISTRY_PASSWORD": "env-pass"}
    flags = HandedCredential(Credential("flag --registry-username", username="flag-user", password="p"), FLAGS)

    def user(environ: dict[str, str]) -> str | None:
        credential = Keychain(environ, tmp_path).credential_for(ImageRef(location, "team/app", "1"), flags)
        return credential.username if credential else None

    assert user({**ON, **environment}) == "env-user"
    assert user(ON) == GCP_USERNAME
    assert user({}) == "flag-user"


def test_acr_pull_with_the_exchanged_refresh_token(aad: AzureIdentity, token_registry: RunningRegistry,
                                                   tmp_path: Path) -> None:
    """The refresh token from /oauth2/exchange is an identity token the registry's token service accepts."""
    tokens = token_registry.token_server
    assert tokens is not None and token_registry.credentials is not None
    built = push_image(token_registry, "iaas/acr", "1", [LayerBuilder().file("cloud", b"azure")],
                       auth=token_registry.credentials)
    with AcrRegistry(aad, lambda: tokens.issue_refresh_token("alice"), upstream=token_registry.url) as acr:
        ref = ImageRef(alias(acr, "acr"), "iaas/acr", "1")
        credential = Keychain(ON, tmp_path).credential_for(ref)
        granted = len(tokens.requests)
        resolved = RegistryClient(ref.location, credential=credential).resolve(ref, PlatformSpec())

    assert resolved.manifest_digest == built.manifest_digest
    assert ("alice", "repository:iaas/acr:pull") in tokens.requests[granted:]


def test_ecr_pull_with_the_authorization_token(ecr: EcrApi, basic_registry: RunningRegistry,
                                               tmp_path: Path) -> None:
    assert basic_registry.credentials is not None
    user, password = basic_registry.credentials
    built = push_image(basic_registry, "iaas/ecr", "1", [LayerBuilder().file("cloud", b"aws")],
                       auth=basic_registry.credentials)
    ecr.token = f"{user}:{password}"
    ref = ImageRef(Location(name="ecr-alias", url=basic_registry.url, iaas="ecr"), "iaas/ecr", "1")

    resolved = RegistryClient(ref.location, credential=Keychain(ON, tmp_path).credential_for(ref)).resolve(
        ref, PlatformSpec())

    assert resolved.manifest_digest == built.manifest_digest
