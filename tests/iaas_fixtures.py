"""The emulated AWS ECR API, and an AWS environment of keys only that leads to it (IaaS and secret tests)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from testsupport.iaas import EcrApi

AWS_SECRET = "emulated-secret-access-key"
ECR_PASSWORD = "ecr-password-from-the-api"


@pytest.fixture
def ecr(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[EcrApi]:
    """The ECR emulation, and an AWS environment of keys only (no profile, no instance metadata) leading to it."""
    with EcrApi(f"AWS:{ECR_PASSWORD}") as api:
        for variable in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL"):
            monkeypatch.delenv(variable, raising=False)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEMULATED")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-2")
        monkeypatch.setenv("AWS_ENDPOINT_URL_ECR", api.url)
        yield api
