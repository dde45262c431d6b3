"""imagemanager.json: Shifter's files load, bad keys are errors naming the key and the file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from imagegw.config import SizeLimit, load_settings
from imagegw.errors import ConfigError, UnknownPlatform

SHIFTER_EXAMPLE = {
    "DefaultImageLocation": "index.docker.io",
    "DefaultImageFormat": "squashfs",
    "PullUpdateTimeout": 300,
    "ImageExpirationTimeout": "90:00:00:00",
    "MongoDBURI": "mongodb://localhost/",
    "MongoDB": "Shifter",
    "CacheDirectory": "/images/cache/",
    "ExpandDirectory": "/images/expand/",
    "WorkerThreads": 1,
    "Metrics": True,
    "Locations": {"index.docker.io": {"remotetype": "dockerv2", "authentication": "http"}},
    "Platforms": {"mycluster": {"mungeSocketPath": "/var/run/munge/munge.socket.2", "accesstype": "local",
                                "admins": ["root"], "local": {"imageDir": "/images"}}},
}


def write(tmp_path: Path, config: dict | str) -> Path:
    path = tmp_path / "imagemanager.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    return path


def test_shifter_example_loads(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, SHIFTER_EXAMPLE))

    assert settings.platform("mycluster").image_dir == Path("/images")
    assert settings.locations["index.docker.io"].url == "https://registry-1.docker.io"
    assert settings.expiration_timeout == 90 * 86400
    assert settings.stale_pull_timeout == 180  # a pull silent for 3 minutes counts as dead
    assert settings.platform("mycluster").compression.algorithm == "gzip"


def test_example_config_shipped_in_the_repository_loads() -> None:
    settings = load_settings(Path(__file__).parent.parent / "config" / "imagemanager.example.json")

    assert str(settings.platform("mycluster").compression) == "zstd:3"
    assert settings.registry_timeout == 60


def test_environment_overrides_mongodb_uri_and_state_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("IMAGEGW_MONGODB_URI", "mongodb://elsewhere:27017/")
    monkeypatch.setenv("IMAGEGW_STATE_DIR", str(tmp_path / "state"))

    settings = load_settings(write(tmp_path, SHIFTER_EXAMPLE))

    assert settings.mongodb_uri == "mongodb://elsewhere:27017/"
    assert settings.state_dir == tmp_path / "state"


def test_unknown_platform_names_the_known_ones_but_not_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, SHIFTER_EXAMPLE)

    with pytest.raises(UnknownPlatform) as error:
        load_settings(path).platform("other")
    assert str(error.value) == "platform 'other' is not defined under Platforms (defined: mycluster)"
    assert str(tmp_path) not in str(error.value)


@pytest.mark.parametrize("change, key", [
    ({"Platforms": {"c": {"accesstype": "local", "local": {}}}}, "Platforms.c.local.imageDir"),
    ({"ImageExpirationTimeout": "90 days"}, "ImageExpirationTimeout"),
    ({"ImageExpirationTimeout": "1:25:00:00"}, "ImageExpirationTimeout"),
    ({"Locations": {"bad": {"url": "ftp://x"}}}, "Locations.bad.url"),
    ({"Locations": {"not a host": {}}}, "Locations.not a host.url"),
    ({"Locations": {"r": {"url": "https://r:99999"}}}, "Locations.r.url"),
    ({"Compresion": "zstd"}, "Compresion"),
    ({"Compression": "zstd:99"}, "Compression"),
    ({"Compression": "brotli"}, "Compression"),
    ({"BlockSize": 1000}, "BlockSize"),
    ({"RegistryTimeout": 0}, "RegistryTimeout"),
    ({"RegistryTimeout": "60"}, "RegistryTimeout"),
    ({"RefreshSchedule": "every 15 minutes"}, "RefreshSchedule"),
    ({"NotifySecret": "short"}, "NotifySecret"),
    ({"NotifySecret": 1234567890123456789}, "NotifySecret"),
    ({"PullUpdateTimeout": "5"}, "PullUpdateTimeout"),
    ({"StalePullTimeout": 5}, "StalePullTimeout"),
    ({"StalePullTimeout": 60.5}, "StalePullTimeout"),
    ({"ApiWorkers": 0}, "ApiWorkers"),
    ({"ApiWorkers": "2"}, "ApiWorkers"),
    ({"Platforms": {}}, "Platforms"),
    ({"Platforms": {"c": {"accesstype": "ftp", "local": {"imageDir": "/x"}}}}, "Platforms.c.accesstype"),
    ({"Platforms": {"c": {"accesstype": "remote", "host": ["h"]}}}, "Platforms.c.ssh"),
    ({"Platforms": {"c": {"accesstype": "remote", "host": [], "ssh": {"username": "s", "imageDir": "/i"}}}},
     "Platforms.c.host"),
    ({"Platforms": {"c": {"accesstype": "remote", "host": ["h:99999"], "ssh": {"username": "s", "imageDir": "/i"}}}},
     "Platforms.c.host"),
    ({"Platforms": {"c": {"accesstype": "remote", "host": ["h"], "ssh": {"username": "s", "imageDir": "images"}}}},
     "Platforms.c.ssh.imageDir"),
    ({"Platforms": {"c": {"accesstype": "remote", "host": ["h"], "ssh": {"imageDir": "/i"}}}},
     "Platforms.c.ssh.username"),
    ({"Platforms": {"c": {"accesstype": "remote", "host": ["h"],
                          "ssh": {"username": "s", "imageDir": "/i", "keyPassphraseEnv": "IMAGEGW_NO_SUCH_VAR"}}}},
     "Platforms.c.ssh.keyPassphraseEnv"),
    ({"Platforms": {"c": {"accesstype": "remote", "host": ["h"],
                          "ssh": {"username": "s", "imageDir": "/i", "sshCmdOptions": ["-A"]}}}},
     "Platforms.c.ssh.sshCmdOptions"),
    ({"Platforms": {"c": {"accesstype": "remote", "host": ["h"],
                          "ssh": {"username": "s", "imageDir": "/i", "scpCmdOptions": ["-o", "Ciphers=aes128-ctr"]}}}},
     "Platforms.c.ssh.scpCmdOptions"),
])
def test_bad_values_are_errors_naming_key_and_file(tmp_path: Path, change: dict, key: str) -> None:
    path = write(tmp_path, {**SHIFTER_EXAMPLE, **change})

    with pytest.raises(ConfigError) as error:
        load_settings(path)

    assert str(error.value).startswith(f"{key} in {path}")


def test_invalid_json_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid JSON.*line 1"):
        load_settings(write(tmp_path, "{nope"))
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_settings(tmp_path / "absent.json")


def test_no_config_given_says_how_to_give_one(monkeypatch) -> None:
    monkeypatch.delenv("IMAGEGW_CONFIG", raising=False)

    with pytest.raises(ConfigError, match="--config FILE or set IMAGEGW_CONFIG"):
        load_settings(None)


def test_insecure_location_is_plain_http(tmp_path: Path) -> None:
    config = {**SHIFTER_EXAMPLE, "Locations": {"reg:5000": {"insecure": True}}}

    settings = load_settings(write(tmp_path, config))

    assert settings.locations["reg:5000"].url == "http://reg:5000"


SHIFTER_REMOTE_EXAMPLE = {
    **SHIFTER_EXAMPLE,
    "Broker": "redis://localhost/",
    "Locations": {"registry-1.docker.io": {"remotetype": "dockerv2", "authentication": "http"}},
    "DefaultImageLocation": "registry-1.docker.io",
    "Platforms": {"mycluster": {"mungeSocketPath": "/var/run/munge/munge.socket.2", "accesstype": "remote",
                                "admins": ["root"], "host": ["login1.example.org"],
                                "ssh": {"username": "shifter", "key": "/home/shifter/.ssh/ssh.key",
                                        "imageDir": "/images"}}},
}


def test_shifters_remote_example_loads(tmp_path: Path) -> None:
    platform = load_settings(write(tmp_path, SHIFTER_REMOTE_EXAMPLE)).platform("mycluster")

    assert platform.remote is not None
    assert [str(host) for host in platform.remote.hosts] == ["login1.example.org"]
    assert platform.remote.username == "shifter" and platform.remote.key == Path("/home/shifter/.ssh/ssh.key")
    assert platform.remote.check_host_keys and platform.remote.known_hosts == Path("~/.ssh/known_hosts").expanduser()
    assert platform.image_dir == Path("/images") and platform.image_location == "login1.example.org:/images"


def test_shifters_ssh_options_become_the_keys_they_mean(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SHIFTER_KEY_PASSPHRASE", "correct horse")
    ssh = {"username": "shifter", "imageDir": "/images", "keyPassphraseEnv": "SHIFTER_KEY_PASSPHRASE",
           "sshCmdOptions": ["-i", "/keys/id_ed25519", "-oStrictHostKeyChecking=no", "-o", "ConnectTimeout=3", "-q"],
           "scpCmdOptions": ["-P", "2222", "-o UserKnownHostsFile=/etc/imagegw/known_hosts", "-oBatchMode=yes"]}
    config = {**SHIFTER_EXAMPLE, "Platforms": {"c": {"accesstype": "remote", "host": ["login1", "login2:2200"],
                                                     "ssh": ssh}}}

    remote = load_settings(write(tmp_path, config)).platform("c").remote

    assert remote is not None
    assert [str(host) for host in remote.hosts] == ["login1:2222", "login2:2200"]
    assert remote.key == Path("/keys/id_ed25519") and remote.key_passphrase == "correct horse"
    assert not remote.check_host_keys and remote.connect_timeout == 3.0
    assert remote.known_hosts == Path("/etc/imagegw/known_hosts")
    assert "correct horse" not in repr(remote)


@pytest.mark.parametrize("value, limit", [
    (1_000_000, SizeLimit(bytes=1_000_000)),
    ("500M", SizeLimit(bytes=500 << 20)),
    ("50G", SizeLimit(bytes=50 << 30)),
    ("50g", SizeLimit(bytes=50 << 30)),
    ("1.5T", SizeLimit(bytes=3 << 39)),
    ("4096", SizeLimit(bytes=4096)),
    ("10%", SizeLimit(percent=10)),
    ("12.5 %", SizeLimit(percent=12.5)),
])
def test_cache_size_limit_in_bytes_or_a_share_of_the_disk(tmp_path: Path, value: int | str, limit: SizeLimit) -> None:
    settings = load_settings(write(tmp_path, {**SHIFTER_EXAMPLE, "CacheSizeLimit": value}))

    assert settings.cache_size_limit == limit


def test_cache_size_limit_defaults_to_a_quarter_of_the_disk_it_is_on(tmp_path: Path) -> None:
    limit = load_settings(write(tmp_path, SHIFTER_EXAMPLE)).cache_size_limit

    assert limit.of(400 << 30) == 100 << 30
    assert limit.of(8 << 40) == 2 << 40
    assert SizeLimit(bytes=5000).of(400 << 30) == 5000  # a size in bytes is the same on any disk


@pytest.mark.parametrize("value, problem", [
    ("50X", "a size like '500M'"),
    ("G", "a size like '500M'"),
    ("", "a size like '500M'"),
    ("-5G", "a size like '500M'"),
    (True, "a size like '500M'"),
    (2.5e9, "a whole number of bytes"),
    (0, "more than 0"),
    ("0M", "more than 0"),
    ("0%", "more than 0 and at most 100"),
    ("150%", "more than 0 and at most 100"),
])
def test_bad_cache_size_limit_names_the_key_and_what_is_wrong(tmp_path: Path, value: object, problem: str) -> None:
    path = write(tmp_path, {**SHIFTER_EXAMPLE, "CacheSizeLimit": value})

    with pytest.raises(ConfigError) as error:
        load_settings(path)

    assert str(error.value).startswith(f"CacheSizeLimit in {path}: ")
    assert problem in str(error.value) and repr(value) in str(error.value)


def test_schedules_and_notify_secret_have_documented_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, SHIFTER_EXAMPLE))
    assert (settings.expire_schedule, settings.refresh_schedule) == ("0 * * * *", "*/15 * * * *")
    assert settings.notify_secret is None, "notifications are refused until an operator sets a secret"
    secret = "s3cret-" + "x" * 16
    changed = {**SHIFTER_EXAMPLE, "RefreshSchedule": "5 * * * *", "NotifySecret": secret}
    settings = load_settings(write(tmp_path, changed))
    assert (settings.refresh_schedule, settings.notify_secret) == ("5 * * * *", secret)
    assert secret not in repr(settings)


def test_allowed_registries_default_to_the_locations_and_docker_hub(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {**SHIFTER_EXAMPLE, "Locations": {"site": {"url": "https://reg.site:5000"}}}))
    assert settings.registry_allowed("reg.site:5000")
    assert settings.registry_allowed("registry-1.docker.io") and settings.registry_allowed("docker.io")
    assert not settings.registry_allowed("evil.example.com")
    assert not settings.registry_allowed("reg.site"), "another port is another registry"


def test_allowed_registries_are_host_globs_one_label_each(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {**SHIFTER_EXAMPLE, "AllowedRegistries": ["*.site.example", "gitlab:*"]}))
    assert settings.registry_allowed("harbor.site.example") and settings.registry_allowed("HARBOR.Site.Example")
    assert not settings.registry_allowed("a.harbor.site.example")
    assert settings.registry_allowed("gitlab:5050") and not settings.registry_allowed("gitlab.site")
    anything = load_settings(write(tmp_path, {**SHIFTER_EXAMPLE, "AllowedRegistries": ["*"]}))
    assert anything.registry_allowed("a.b.c.example:1234")


@pytest.mark.parametrize("value, problem", [
    ("*.site", "must be a non-empty list"),
    ([], "must be a non-empty list"),
    (["*", "reg.site"], "list it alone"),
    (["https://reg.site/v2/"], "give the registry's host[:port] only"),
])
def test_bad_allowed_registries_say_what_is_wrong(tmp_path: Path, value: object, problem: str) -> None:
    path = write(tmp_path, {**SHIFTER_EXAMPLE, "AllowedRegistries": value})
    with pytest.raises(ConfigError, match=re.escape(problem)) as error:
        load_settings(path)
    assert str(error.value).startswith(f"AllowedRegistries in {path}")


def test_a_location_password_may_come_from_a_file_or_a_variable(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "site.password").write_text("from:file\n")
    monkeypatch.setenv("SITE_REGISTRY_PASSWORD", "from-env")
    locations = {"filed": {"url": "https://a.site", "username": "u", "passwordFile": str(tmp_path / "site.password")},
                 "env": {"url": "https://b.site", "username": "u", "passwordEnv": "SITE_REGISTRY_PASSWORD"}}
    settings = load_settings(write(tmp_path, {**SHIFTER_EXAMPLE, "Locations": locations}))
    assert settings.locations["filed"].password == "from:file"
    assert settings.locations["env"].password == "from-env"
    assert "from-env" not in repr(settings)


@pytest.mark.parametrize("spec, key, problem", [
    ({"username": "u", "password": "p", "passwordEnv": "X"}, "Locations.r.passwordEnv",
     "give one of password, passwordFile and passwordEnv"),
    ({"passwordEnv": "X"}, "Locations.r.username", "passwordEnv needs a username"),
    ({"username": "u", "passwordEnv": "IMAGEGW_TEST_UNSET_VARIABLE"}, "Locations.r.passwordEnv",
     "IMAGEGW_TEST_UNSET_VARIABLE is not set"),
    ({"username": "u", "passwordFile": "/nonexistent/password"}, "Locations.r.passwordFile", "cannot read"),
])
def test_bad_location_passwords_name_the_key(tmp_path: Path, spec: dict, key: str, problem: str) -> None:
    path = write(tmp_path, {**SHIFTER_EXAMPLE, "Locations": {"r": {"url": "https://r.site", **spec}}})
    with pytest.raises(ConfigError, match=re.escape(problem)) as error:
        load_settings(path)
    assert str(error.value).startswith(f"{key} in {path}")


def test_the_seal_key_lives_in_the_state_directory_unless_named(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, SHIFTER_EXAMPLE))
    assert settings.seal_key_path == settings.state_dir / "seal.key"
    shared = load_settings(write(tmp_path, {**SHIFTER_EXAMPLE, "SealKeyFile": "/etc/imagegw/seal.key"}))
    assert shared.seal_key_path == Path("/etc/imagegw/seal.key")
