"""pinhook's docker config file, read as docker reads it: auths (matched as the kubelet
matches them, with identity and registry tokens), credHelpers and credsStore.

The helper is a script of ours on a test-local PATH (tests/credprograms.py) speaking the
docker-credential-helpers protocol: ``get`` as its argument, the server URL on stdin, JSON on
stdout, or ``credentials not found in native keychain`` and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from tests.credprograms import Gate, Program, token_settings
from tests.harness.fixtures import RegistryEnv
from webhook.errors import ConfigError
from webhook.kube import NoPullSecrets
from webhook.oci.credhelper import DockerConfig
from webhook.oci.reference import ImageRef
from webhook.oci.registry import RegistryClient
from webhook.resolve import PullScope, RegistryDigestResolver
from webhook.runtime import registry_options

NOT_FOUND = {"exit": 1, "stdout": "credentials not found in native keychain\n"}


def _auth(username: str, password: str) -> str:
    return base64.b64encode(f"{username}:{password}".encode()).decode()


def deadline(seconds: float = 10.0) -> float:
    return asyncio.get_running_loop().time() + seconds


@pytest.fixture
def helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Program:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return Program(bin_dir / "docker-credential-test")


def config_file(tmp_path: Path, document: dict[str, Any]) -> DockerConfig:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(document))
    return DockerConfig.from_file(path)


async def found(config: DockerConfig, image: str) -> list[tuple[str, str, str]]:
    credentials = await config.lookup(ImageRef.parse(image), deadline())
    return [(c.username, c.password, c.identity_token) for c in credentials]


def answer(username: str, secret: str, server: str = "", **extra: Any) -> dict[str, Any]:
    return {"response": {"ServerURL": server, "Username": username, "Secret": secret, **extra}}


# -- the file ------------------------------------------------------------------------------


async def test_a_realistic_config_json(tmp_path: Path) -> None:
    config = config_file(
        tmp_path,
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": _auth("hubuser", "hub-token")},
                "ghcr.io": {"auth": _auth("octocat", "ghp_example")},
                "registry.example.com:5000": {
                    "username": "robot$ci",
                    "password": "p:a:s:s",
                    "email": "ci@example.com",
                },
                "myacr.azurecr.io": {
                    "auth": _auth("00000000-0000-0000-0000-000000000000", ""),
                    "identitytoken": "refresh-token",
                },
                "token.example.com": {"registrytoken": "bearer-token"},
            },
            "psFormat": "table {{.ID}}",
        },
    )
    assert config.keyring.keys() == [
        "token.example.com",
        "registry.example.com:5000",
        "myacr.azurecr.io",
        "index.docker.io",
        "ghcr.io",
    ]
    assert await found(config, "ghcr.io/octo/app:1") == [("octocat", "ghp_example", "")]
    assert await found(config, "registry.example.com:5000/team/app") == [
        ("robot$ci", "p:a:s:s", "")
    ]
    assert await found(config, "busybox") == [("hubuser", "hub-token", "")]
    assert await found(config, "myacr.azurecr.io/app") == [
        ("00000000-0000-0000-0000-000000000000", "", "refresh-token")
    ]
    (token,) = await config.lookup(ImageRef.parse("token.example.com/app"), deadline())
    assert token.registry_token == "bearer-token"
    assert "bearer-token" not in repr(token) and "refresh" not in repr(config.keyring)
    assert token.source == f"docker config {tmp_path / 'config.json'}"


async def test_the_legacy_dockercfg_form(tmp_path: Path) -> None:
    config = config_file(tmp_path, {"https://quay.io": {"auth": _auth("legacy", "pw")}})
    assert await found(config, "quay.io/coreos/etcd:v3") == [("legacy", "pw", "")]


def test_a_config_without_credentials_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_file(tmp_path, {"psFormat": "x"})
    assert not config.keyring
    assert "has no credentials" in caplog.text


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"credsStore": 1}, '"credsStore" must be a string'),
        ({"credHelpers": ["x"]}, '"credHelpers" must be a JSON object'),
        ({"auths": {"r.io": {"identitytoken": 5}}}, "'identitytoken' is not a string"),
        ({"auths": {"r.io": {"auth": "SECRETVALUE"}}}, "not base64"),
    ],
)
def test_a_bad_file_is_a_config_error(tmp_path: Path, document: Any, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as caught:
        config_file(tmp_path, document)
    assert "SECRETVALUE" not in str(caught.value)


def test_an_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        DockerConfig.from_file(tmp_path / "missing.json")


# -- helpers ---------------------------------------------------------------------------------


async def test_cred_helpers_run_docker_credential_name_get(tmp_path: Path, helper: Program) -> None:
    helper.answer(answer("helper-user", "helper-secret", "r.io"))
    config = config_file(
        tmp_path,
        {"auths": {"r.io": {"auth": _auth("file", "pw")}}, "credHelpers": {"r.io": "test"}},
    )
    # The helper wins: docker does not fall back to the file's entry for that registry.
    assert await found(config, "r.io/team/app:1") == [("helper-user", "helper-secret", "")]
    (call,) = helper.calls
    assert (call["argv"], call["stdin"]) == (["get"], "r.io")
    (credential,) = await config.lookup(ImageRef.parse("r.io/a"), deadline())
    assert credential.source.endswith("via docker-credential-test")


async def test_docker_hub_is_looked_up_by_dockers_index_server_key(
    tmp_path: Path, helper: Program
) -> None:
    helper.answer(answer("hub", "secret"))
    config = config_file(tmp_path, {"credHelpers": {"https://index.docker.io/v1/": "test"}})
    assert await found(config, "nginx:1.27") == [("hub", "secret", "")]
    assert helper.calls[0]["stdin"] == "https://index.docker.io/v1/"
    # A "docker.io" key is not docker's key for Docker Hub.
    other = config_file(tmp_path, {"credHelpers": {"docker.io": "test"}})
    assert await found(other, "nginx:1.27") == []
    assert len(helper.calls) == 1


async def test_creds_store_serves_registries_without_a_cred_helper(
    tmp_path: Path, helper: Program
) -> None:
    helper.answer(answer("store", "secret"))
    config = config_file(
        tmp_path,
        {
            "auths": {"r.io": {}, "s.io": {"auth": _auth("file", "pw")}},
            "credsStore": "test",
            "credHelpers": {"s.io": ""},  # an empty helper: docker reads the file for it
        },
    )
    assert await found(config, "r.io/app") == [("store", "secret", "")]
    assert await found(config, "s.io/app") == [("file", "pw", "")]
    assert [call["stdin"] for call in helper.calls] == ["r.io"]


async def test_credentials_not_found_is_no_credential_and_no_warning(
    tmp_path: Path, helper: Program, caplog: pytest.LogCaptureFixture
) -> None:
    helper.answer(NOT_FOUND)
    config = config_file(
        tmp_path, {"auths": {"r.io": {"auth": _auth("file", "pw")}}, "credsStore": "test"}
    )
    assert await found(config, "r.io/app") == []
    assert "docker-credential-test" not in caplog.text


async def test_the_token_username_marks_an_identity_token(tmp_path: Path, helper: Program) -> None:
    helper.answer(answer("<token>", "refresh-token"))
    config = config_file(tmp_path, {"credsStore": "test"})
    (credential,) = await config.lookup(ImageRef.parse("myacr.azurecr.io/app"), deadline())
    assert (credential.username, credential.password) == ("", "")
    assert credential.identity_token == "refresh-token"


async def test_the_answer_is_read_as_gos_decoder_reads_it(tmp_path: Path, helper: Program) -> None:
    helper.answer({"raw": '{"serverurl": "r.io", "USERNAME": "u", "secret": "s"}\ntrailing'})
    config = config_file(tmp_path, {"credsStore": "test"})
    assert await found(config, "r.io/app") == [("u", "s", "")]


@pytest.mark.parametrize(
    ("reply", "logged"),
    [
        ({"exit": 1, "stdout": "error getting credentials - keychain locked"}, "keychain locked"),
        ({"raw": "not json"}, "the answer is not JSON"),
        ({"raw": '{"Username": 5, "Secret": "s"}'}, "'username' is not a string"),
    ],
)
async def test_a_failing_helper_gives_no_credential_and_is_logged_once(
    tmp_path: Path,
    helper: Program,
    caplog: pytest.LogCaptureFixture,
    reply: dict[str, Any],
    logged: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="webhook.oci.credhelper")
    helper.answer(reply)
    config = config_file(tmp_path, {"credsStore": "test"})
    assert await found(config, "r.io/app") == []
    assert await found(config, "r.io/app") == []
    messages = [r.getMessage() for r in caplog.records if logged in r.getMessage()]
    assert len(messages) == 1
    assert len(helper.calls) == 2


async def test_a_missing_helper_is_logged_once(
    tmp_path: Path, helper: Program, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_file(tmp_path, {"credsStore": "desktop"})
    assert await found(config, "r.io/app") == []
    assert await found(config, "r.io/app") == []
    assert caplog.text.count("docker-credential-desktop is not on PATH") == 1


async def test_concurrent_lookups_share_one_helper_run(tmp_path: Path, helper: Program) -> None:
    gate = Gate(tmp_path)
    helper.answer(gate.hold(answer("u", "s")))
    config = config_file(tmp_path, {"credsStore": "test"})
    lookups = [asyncio.create_task(found(config, "r.io/app")) for _ in range(10)]
    await gate.started()
    await gate.release()
    assert await asyncio.gather(*lookups) == [[("u", "s", "")]] * 10
    assert len(helper.calls) == 1


async def test_a_helper_credential_pins_an_image_behind_token_auth(
    token_registry: RegistryEnv, tmp_path: Path, helper: Program
) -> None:
    pushed = token_registry.push.index("helper/app", "1.0")
    helper.answer(answer("bob", "builder", token_registry.host))
    config = config_file(tmp_path, {"credHelpers": {token_registry.host: "test"}})
    settings = token_settings(token_registry)
    async with RegistryClient(registry_options(settings)) as client:
        resolver = RegistryDigestResolver(client, NoPullSecrets(), config)
        resolution = await resolver.resolve(
            ImageRef.parse(pushed.tag_ref), PullScope("apps"), deadline()
        )
    assert resolution.digest == pushed.digest
    assert helper.calls[0]["stdin"] == token_registry.host
