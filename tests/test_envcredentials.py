"""Registry credentials from IMAGEGW_REGISTRY_* / IMGPKG_REGISTRY_* variables.

The tables follow imgpkg's behaviour, checked by running it (shared/reference/registry-auth.md §1). Rows
marked "imgpkg: …" are where we deliberately give another answer, and say why.
"""

from __future__ import annotations

import pytest

from imagegw.errors import ConfigError
from imagegw.registry.credentials import Credential
from imagegw.registry.envcredentials import EnvironmentCredentials

PASSWORD = "pa55-w0rd=with=equals"
IDENTITY = "identity-t0ken-value"
TOKEN = "registry-t0ken-value"
SECRETS = (PASSWORD, IDENTITY, TOKEN)


def login(hostname: str, suffix: str = "", prefix: str = "IMAGEGW_REGISTRY_", user: str = "user") -> dict[str, str]:
    """One set of variables: ``hostname`` with a username and password."""
    tail = f"_{suffix}" if suffix else ""
    return {f"{prefix}HOSTNAME{tail}": hostname, f"{prefix}USERNAME{tail}": user, f"{prefix}PASSWORD{tail}": PASSWORD}


def numbered(*hostnames: str) -> dict[str, str]:
    """Sets ``_0``, ``_1``, … for ``hostnames``, whose usernames are ``u0``, ``u1``, …"""
    env: dict[str, str] = {}
    for number, hostname in enumerate(hostnames):
        env |= login(hostname, suffix=str(number), user=f"u{number}")
    return env


def username_for(env: dict[str, str], image: str) -> str | None:
    """The username the environment gives for ``image`` (``host/repository``); None: anonymous."""
    host, repository = image.split("/", 1)
    credential = EnvironmentCredentials.from_environment(env).credential_for(host, repository)
    return credential.username if credential else None


def load_error(env: dict[str, str]) -> str:
    with pytest.raises(ConfigError) as caught:
        EnvironmentCredentials.from_environment(env)
    return str(caught.value)


ONE_HOSTNAME = [
    # hostname, image, username (None: anonymous)
    ("localhost:9999", "localhost:9999/imgpkg_test", "user"),
    ("http://localhost:9999", "localhost:9999/imgpkg_test", "user"),
    ("https://localhost:9999", "localhost:9999/imgpkg_test", "user"),
    ("localhost:9999/v1/", "localhost:9999/imgpkg_test", "user"),
    ("localhost:9999/v2/", "localhost:9999/imgpkg_test", "user"),
    ("*:9999/v2/", "localhost:9999/imgpkg_test", "user"),
    ("local*:9999", "localhost:9999/imgpkg_test", "user"),
    ("localhost", "localhost:9999/imgpkg_test", None),
    ("localhost:9998", "localhost:9999/imgpkg_test", None),
    ("localhost:9999/v2", "localhost:9999/imgpkg_test", None),  # no trailing /: a repository named v2
    ("*.localhost:9999", "sub1.sub2.localhost:9999/xx", None),
    ("*.*.localhost:9999", "sub1.sub2.localhost:9999/xx", "user"),
    # imgpkg: anonymous (only docker.io in the image is rewritten). The docs give docker.io as the example.
    ("docker.io", "docker.io/library/nginx", "user"),
    ("docker.io", "index.docker.io/library/nginx", "user"),
    ("index.docker.io", "index.docker.io/library/nginx", "user"),
    ("index.docker.io", "docker.io/library/nginx", "user"),
    ("https://index.docker.io/v1/", "docker.io/library/nginx", "user"),
    ("*.docker.io", "docker.io/library/nginx", "user"),
    ("index.docker.io/library/nginx", "docker.io/library/nginx", "user"),
    # imgpkg: anonymous. All four are Docker Hub; which one the hostname or image says does not matter.
    ("registry-1.docker.io", "docker.io/library/nginx", "user"),
    ("registry.hub.docker.com", "index.docker.io/library/nginx", "user"),
    ("docker.io/library/nginx", "index.docker.io/library/nginx", "user"),
    ("index.docker.io/nginx", "docker.io/library/nginx", None),  # the path is library/nginx, as in imgpkg
    ("*.docker.io", "registry-1.docker.io/library/nginx", "user"),
    ("gcr.io/repo/image", "gcr.io/repo/image", "user"),
    ("gcr.io/repo/image", "gcr.io/repo/image/sub", "user"),
    # imgpkg: user (a string prefix). A credential for team/app must not go to team/app2, someone else's.
    ("gcr.io/repo/image", "gcr.io/repo/image2", None),
    ("gcr.io/repo/image", "gcr.io/repo", None),
    ("gcr.io/repo/image", "gcr.io/other/image", None),
    ("gcr.io/repo/", "gcr.io/repo/xx", "user"),
    # imgpkg: anonymous. A trailing / adds no path component, so it names the repository too.
    ("gcr.io/repo/", "gcr.io/repo", "user"),
    # imgpkg: anonymous (case-sensitive). Host names are not: DNS does not care, nor do we.
    ("GCR.io", "gcr.io/x/y", "user"),
    ("gcr.io", "GCR.IO/x/y", "user"),
    # imgpkg: anonymous (? starts a URL query there). Here it is the one-character glob hostglob documents.
    ("gcr.i?", "gcr.io/x/y", "user"),
    ("*.io", "gcr.io/x/y", "user"),
    ("*.io", "us.gcr.io/x/y", None),
    # imgpkg: anonymous (nginx is index.docker.io there, three labels). Docker Hub is also docker.io, which *.io is.
    ("*.io", "index.docker.io/library/nginx", "user"),
    ("127.0.0.1:5000", "127.0.0.1:5000/x/y", "user"),
    ("*.0.0.1:5000", "127.0.0.1:5000/x/y", "user"),
    ("[::1]:5000", "[::1]:5000/x/y", "user"),
    ("localhost:*", "localhost:5000/x", "user"),
]


@pytest.mark.parametrize(("hostname", "image", "expected"), ONE_HOSTNAME)
def test_which_images_a_hostname_matches(hostname: str, image: str, expected: str | None) -> None:
    assert username_for(login(hostname), image) == expected


SEVERAL_HOSTNAMES = [
    # hostnames (_0, _1, …), image, the username of the set that wins
    (("*.docker.io", "foo.docker.io"), "foo.docker.io/image", "u1"),
    (("localhost:9999", "localhost:9999/imgpkg_test"), "localhost:9999/imgpkg_test/imagename", "u1"),
    # imgpkg: _1 (reverse lexicographic order puts "l" before "*"). The set scoped to the repository wins.
    (("*:9999/imgpkg_test/imagename", "localhost:9999"), "localhost:9999/imgpkg_test/imagename", "u0"),
    # imgpkg: _0. More path components first, then exact before glob: one rule, not an accident of sorting.
    (("a.example.com", "*.example.com/team"), "a.example.com/team/img", "u1"),
    (("*.example.com", "a.example.com"), "a.example.com/img", "u1"),
    (("a.example.com", "*.example.com"), "b.example.com/img", "u1"),
    # Two globs, same path: the more literal one is the more specific.
    (("*.*.com", "*.example.com"), "a.example.com/img", "u1"),
    (("*.example.com", "*.*.com"), "a.example.com/img", "u0"),
    # Equally specific globs: the hostname variable's name decides, never the environment's order.
    (("a.*.com", "*.b.com"), "a.b.com/img", "u0"),
    (("gcr.io/team", "gcr.io/team/app", "gcr.io"), "gcr.io/team/app/sub", "u1"),
    (("gcr.io/team", "gcr.io/team/app", "gcr.io"), "gcr.io/team/other", "u0"),
    (("gcr.io/team", "gcr.io/team/app", "gcr.io"), "gcr.io/elsewhere/app", "u2"),
]


@pytest.mark.parametrize(("hostnames", "image", "expected"), SEVERAL_HOSTNAMES)
def test_which_set_wins(hostnames: tuple[str, ...], image: str, expected: str) -> None:
    assert username_for(numbered(*hostnames), image) == expected


@pytest.mark.parametrize("hostnames", [("a.example.com", "*.example.com"), ("*.example.com", "a.example.com")])
def test_the_order_does_not_depend_on_the_environment_order(hostnames: tuple[str, str]) -> None:
    forwards = login(hostnames[0], "A", user="a") | login(hostnames[1], "B", user="b")
    backwards = dict(reversed(forwards.items()))
    assert username_for(forwards, "a.example.com/x") == username_for(backwards, "a.example.com/x")


def test_the_unsuffixed_set_is_one_more_entry() -> None:
    env = login("gcr.io", user="plain") | login("gcr.io/team", "X", user="x")
    assert username_for(env, "gcr.io/team/img") == "x"
    assert username_for(env, "gcr.io/other/img") == "plain"


TOKENS = [
    ({"IMAGEGW_REGISTRY_HOSTNAME_a": "r.io", "IMAGEGW_REGISTRY_IDENTITY_TOKEN_a": IDENTITY},
     Credential("environment IMAGEGW_REGISTRY_*_a", identity_token=IDENTITY)),
    ({"IMAGEGW_REGISTRY_HOSTNAME_MY_REG": "r.io", "IMAGEGW_REGISTRY_REGISTRY_TOKEN_MY_REG": TOKEN},
     Credential("environment IMAGEGW_REGISTRY_*_MY_REG", registry_token=TOKEN)),
    (login("r.io"), Credential("environment IMAGEGW_REGISTRY_* (unsuffixed)", username="user", password=PASSWORD)),
    (login("r.io", "CI", prefix="IMGPKG_REGISTRY_"),
     Credential("environment IMGPKG_REGISTRY_*_CI", username="user", password=PASSWORD)),
]


@pytest.mark.parametrize(("env", "expected"), TOKENS)
def test_the_credential_and_its_source(env: dict[str, str], expected: Credential) -> None:
    # The password keeps its "=": everything after the variable's first "=" is the value.
    assert EnvironmentCredentials.from_environment(env).credential_for("r.io", "xx") == expected


def test_the_imgpkg_prefix_gives_entries_of_its_own() -> None:
    env = login("a.io", "CI", user="ours") | login("b.io", "CI", prefix="IMGPKG_REGISTRY_", user="imgpkg")
    assert (username_for(env, "a.io/x"), username_for(env, "b.io/x")) == ("ours", "imgpkg")


def test_other_variables_are_not_ours() -> None:
    env = {"PATH": "/bin", "IMAGEGW_CONFIG": "x", "IMGPKG_USERNAME": "u", "IMGPKG_REGISTRY_AZURE_CR_CONFIG": "/az"}
    assert EnvironmentCredentials.from_environment(env).credential_for("r.io", "xx") is None


ERRORS = [
    # env, the variable the message must name
    # imgpkg: _0, _1 or _2 at random (24/3/3 over 30 runs). Here the operator is told to keep one.
    (numbered("gcr.io", "gcr.io", "gcr.io"), "IMAGEGW_REGISTRY_HOSTNAME_0"),
    (numbered("gcr.io/team", "https://GCR.io/v2/team/"), "IMAGEGW_REGISTRY_HOSTNAME_1"),
    (numbered("docker.io", "index.docker.io"), "IMAGEGW_REGISTRY_HOSTNAME_1"),
    (login("r.io", "CI") | login("r.io", "CI", prefix="IMGPKG_REGISTRY_"), "IMGPKG_REGISTRY_HOSTNAME_CI"),
    # imgpkg: an empty credential that shadows docker config and flags.
    ({"IMAGEGW_REGISTRY_HOSTNAME_0": "r.io", "IMAGEGW_REGISTRY_USERNAME_1": "u1"}, "IMAGEGW_REGISTRY_HOSTNAME_0"),
    ({"IMAGEGW_REGISTRY_USERNAME_1": "u1", "IMAGEGW_REGISTRY_PASSWORD_1": PASSWORD}, "IMAGEGW_REGISTRY_HOSTNAME_1"),
    ({"IMAGEGW_REGISTRY_REGISTRY_TOKEN_1": TOKEN}, "IMAGEGW_REGISTRY_HOSTNAME_1"),
    # imgpkg: never matches, silently.
    (login(""), "IMAGEGW_REGISTRY_HOSTNAME"),
    ({"IMAGEGW_REGISTRY_HOSTNAME": "r.io", "IMAGEGW_REGISTRY_USERNAME": "user"}, "IMAGEGW_REGISTRY_PASSWORD"),
    ({"IMAGEGW_REGISTRY_HOSTNAME": "r.io", "IMAGEGW_REGISTRY_PASSWORD": PASSWORD}, "IMAGEGW_REGISTRY_USERNAME"),
    (login("r.io") | {"IMAGEGW_REGISTRY_PASSWORD": ""}, "IMAGEGW_REGISTRY_PASSWORD"),
    (login("r.io") | {"IMAGEGW_REGISTRY_REGISTRY_TOKEN": TOKEN}, "IMAGEGW_REGISTRY_REGISTRY_TOKEN"),
    ({"IMAGEGW_REGISTRY_HOSTNAME": "r.io", "IMAGEGW_REGISTRY_IDENTITY_TOKEN": IDENTITY,
      "IMAGEGW_REGISTRY_REGISTRY_TOKEN": TOKEN}, "IMAGEGW_REGISTRY_IDENTITY_TOKEN"),
    # imgpkg: an error too ("Unknown env variable"), except its Azure setting.
    (login("r.io") | {"IMAGEGW_REGISTRY_HOSTNAMEX": "r.io"}, "IMAGEGW_REGISTRY_HOSTNAMEX"),
    (login("r.io") | {"IMGPKG_REGISTRY_USER": "user"}, "IMGPKG_REGISTRY_USER"),
    (login("r.io") | {"IMAGEGW_REGISTRY_USERNAME_": "user"}, "IMAGEGW_REGISTRY_USERNAME_"),
    (login("r.io") | {"IMAGEGW_REGISTRY_AZURE_CR_CONFIG": "/az"}, "IMAGEGW_REGISTRY_AZURE_CR_CONFIG"),
]


@pytest.mark.parametrize(("env", "variable"), ERRORS)
def test_a_bad_set_of_variables_is_named(env: dict[str, str], variable: str) -> None:
    message = load_error(env)
    assert variable in message
    assert not any(secret in message for secret in SECRETS)


BAD_HOSTNAMES = [
    # imgpkg: an error when an image is pulled. Here, when the gateway starts.
    "[a-h]cr.io",  # "[" starts an IPv6 address in a host, as in a URL: no character classes
    "http://[::1]:namedport",
    "http://%41:8080/",
    "[::g]:5000",
    "[1::2::3]:5000",
    "localhost:",
    "localhost:0",
    "localhost:65536",
    "ftp://gcr.io",
    "gcr.io:443:1",
    "gcr .io",
    "https:///team",
    "gcr.io//team",
    "gcr.io/Team/app",  # repository names are lower case: this one could never match
    "gcr.io/team/*",  # paths match by component, not by glob
    "https://gcr.io/?tag=x",
]


@pytest.mark.parametrize("hostname", BAD_HOSTNAMES)
def test_a_hostname_that_does_not_parse_is_named(hostname: str) -> None:
    message = load_error(login(hostname, "CI"))
    assert "IMAGEGW_REGISTRY_HOSTNAME_CI" in message
    assert PASSWORD not in message


def test_secrets_are_in_no_repr_or_str() -> None:
    env = (login("a.io", "A") | {"IMAGEGW_REGISTRY_HOSTNAME_B": "b.io", "IMAGEGW_REGISTRY_IDENTITY_TOKEN_B": IDENTITY,
                                 "IMAGEGW_REGISTRY_HOSTNAME_C": "c.io", "IMAGEGW_REGISTRY_REGISTRY_TOKEN_C": TOKEN})
    credentials = EnvironmentCredentials.from_environment(env)
    found = [credentials.credential_for(host, "x") for host in ("a.io", "b.io", "c.io")]
    assert all(found)
    for shown in (credentials, *found):
        assert not any(secret in text for secret in SECRETS for text in (repr(shown), str(shown)))
