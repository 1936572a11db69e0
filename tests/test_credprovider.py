"""Kubelet credential provider plugins: the config, the exec protocol, the cache, and pinning
against the real loopback registry with token auth.

The provider is a script of ours speaking the protocol (tests/credprograms.py). The kubelet's
rules come from kubernetes pkg/credentialprovider/plugin (v1.36): config.go, plugin.go.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.credprograms import V1, Gate, Program, provider_response, token_settings
from tests.harness.fixtures import RegistryEnv
from tests.reviews import review
from webhook.admission import parse_review
from webhook.config import load_settings
from webhook.errors import ConfigError, DeadlineExceeded, Unauthorized
from webhook.kube import NoPullSecrets, StaticPullSecrets
from webhook.metrics import Metrics
from webhook.oci.credential import PullContext
from webhook.oci.credhelper import DockerConfig
from webhook.oci.credprovider import (
    CredentialProviders,
    ProviderSpec,
    load_provider_config,
    parse_response,
)
from webhook.oci.keychain import DockerKeyring
from webhook.oci.reference import ImageRef
from webhook.oci.registry import RegistryClient
from webhook.resolve import PullScope, RegistryDigestResolver
from webhook.runtime import Runtime, registry_options


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def spec(name: str = "fake", *match: str, default: float = 3600.0, **extra: Any) -> ProviderSpec:
    return ProviderSpec(name, match or ("*.io", "*.*.io"), default, V1, **extra)


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    path = tmp_path / "bin"
    path.mkdir()
    return path


@pytest.fixture
def fake(bin_dir: Path) -> Program:
    return Program(bin_dir / "fake")


def deadline(seconds: float = 10.0) -> float:
    return asyncio.get_running_loop().time() + seconds


def ref(text: str) -> ImageRef:
    return ImageRef.parse(text)


def pairs(credentials: list[Any]) -> list[tuple[str, str]]:
    return [(c.username, c.password) for c in credentials]


Make = Callable[..., CredentialProviders]


@pytest.fixture
def providers(bin_dir: Path, fake: Program) -> Make:
    def make(
        *specs: ProviderSpec, clock: Clock | None = None, **kwargs: Any
    ) -> CredentialProviders:
        return CredentialProviders(specs or (spec(),), bin_dir, clock=clock or Clock(), **kwargs)

    return make


# -- the config ------------------------------------------------------------------------------

CONFIG_YAML = """\
apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  - name: ecr-credential-provider
    matchImages:
      - "*.dkr.ecr.*.amazonaws.com"
      - "*.dkr.ecr.*.amazonaws.com.cn"
    defaultCacheDuration: "12h"
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    args: [get-credentials]
    env:
      - name: AWS_PROFILE
        value: ecr
"""


def test_a_kubelet_config_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG_YAML)
    (provider,) = load_provider_config(path)
    assert provider == ProviderSpec(
        "ecr-credential-provider",
        ("*.dkr.ecr.*.amazonaws.com", "*.dkr.ecr.*.amazonaws.com.cn"),
        43200.0,
        V1,
        ("get-credentials",),
        (("AWS_PROFILE", "ecr"),),
    )


def test_a_directory_is_read_in_name_order_and_only_config_files(tmp_path: Path) -> None:
    def write(name: str, provider: str) -> None:
        (tmp_path / name).write_text(CONFIG_YAML.replace("ecr-credential-provider", provider))

    write("20-b.yml", "second")
    (tmp_path / "10-a.json").write_text(
        json.dumps(
            {
                "apiVersion": "kubelet.config.k8s.io/v1beta1",
                "kind": "CredentialProviderConfig",
                "providers": [
                    {
                        "name": "first",
                        "matchImages": ["a.io"],
                        "defaultCacheDuration": "0",
                        "apiVersion": "credentialprovider.kubelet.k8s.io/v1beta1",
                    }
                ],
            }
        )
    )
    write("30-c.yaml.bak", "ignored")
    (tmp_path / "..data").mkdir()  # a ConfigMap volume's own entries are not config files
    assert [p.name for p in load_provider_config(tmp_path)] == ["first", "second"]


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda t: t.replace("    args:", "    arguments:"), "unknown field 'arguments'"),
        (lambda t: t.replace('"12h"', "12"), "expected a duration string"),
        (lambda t: t.replace('"12h"', '"12 hours"'), "unknown unit"),
        (lambda t: t.replace('"12h"', '"-1h"'), "greater than or equal to 0"),
        (
            lambda t: t.replace('    defaultCacheDuration: "12h"\n', ""),
            "defaultCacheDuration: required",
        ),
        (lambda t: t.replace("name: ecr-credential-provider", "name: a/b"), "not a valid provider"),
        (
            lambda t: t.replace('      - "*.dkr.ecr.*.amazonaws.com.cn"\n', '      - "a[.io"\n'),
            "'a[.io'",
        ),
        (lambda t: t.replace("credentialprovider.kubelet.k8s.io/v1", "v1"), "'v1' is not one of"),
        (
            lambda t: t.replace("kind: CredentialProviderConfig", "kind: KubeletConfiguration"),
            "expected kind",
        ),
        (lambda t: t.replace("config.k8s.io/v1\n", "config.k8s.io/v2\n"), "expected kind"),
        (lambda t: t.replace("    args:", "    name: again\n    args:"), "duplicate key 'name'"),
        (lambda t: t.replace("value: ecr", "value: 1"), "env[0].value: expected a string"),
        (lambda t: t.replace("providers:", "Providers:"), "unknown field 'Providers'"),
        (lambda t: t.split("providers:")[0], "at least 1 item"),
        (
            lambda t: (
                t.replace("config.k8s.io/v1\n", "config.k8s.io/v1beta1\n")
                + "    tokenAttributes: {}\n"
            ),
            "unknown field 'tokenAttributes'",
        ),
        (
            lambda t: t + "    tokenAttributes:\n      serviceAccountTokenAudience: aud\n",
            "requireServiceAccount: required",
        ),
    ],
)
def test_the_config_is_as_strict_as_the_kubelets(
    tmp_path: Path, edit: Callable[[str], str], problem: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(edit(CONFIG_YAML))
    with pytest.raises(ConfigError) as caught:
        load_provider_config(path)
    assert problem in str(caught.value)
    assert str(path) in str(caught.value)


def test_a_provider_name_may_appear_once_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(CONFIG_YAML)
    (tmp_path / "b.yaml").write_text(CONFIG_YAML)
    with pytest.raises(ConfigError, match="more than once"):
        load_provider_config(tmp_path)


def test_an_empty_directory_or_a_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no configuration files"):
        load_provider_config(tmp_path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_provider_config(tmp_path / "missing.yaml")


def test_the_bin_dir_and_each_program_must_exist(tmp_path: Path, bin_dir: Path) -> None:
    with pytest.raises(ConfigError, match="bin dir"):
        CredentialProviders([spec()], tmp_path / "nope")
    with pytest.raises(ConfigError, match="does not exist"):
        CredentialProviders([spec("missing")], bin_dir)
    (bin_dir / "plain").write_text("not executable")
    with pytest.raises(ConfigError, match="not executable"):
        CredentialProviders([spec("plain")], bin_dir)


def test_providers_needing_a_service_account_token_are_not_run(
    bin_dir: Path, fake: Program, caplog: pytest.LogCaptureFixture
) -> None:
    Program(bin_dir / "other")
    providers = CredentialProviders(
        [spec(needs_service_account_token=True), spec("other")], bin_dir
    )
    assert providers.names == ["other"]
    assert "service account token" in caplog.text


# -- the exec protocol -----------------------------------------------------------------------


async def test_the_request_args_and_environment_are_the_kubelets(
    providers: Make, fake: Program, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PINHOOK_TEST_INHERITED", "from pinhook")
    monkeypatch.setenv("PINHOOK_TEST_OVERRIDDEN", "from pinhook")
    fake.answer(provider_response({"docker.io": ("u", "p")}))
    env = (("PINHOOK_TEST_OVERRIDDEN", "from config"), ("PINHOOK_TEST_ADDED", "yes"))
    found = await providers(
        spec("fake", "docker.io", args=("get-credentials", "--v=2"), env=env)
    ).lookup(ref("nginx:1.27"), deadline())
    assert pairs(found) == [("u", "p")]
    (call,) = fake.calls
    assert call["stdin"] == (
        '{"kind":"CredentialProviderRequest","apiVersion":"credentialprovider.kubelet.k8s.io/v1",'
        '"image":"docker.io/library/nginx"}\n'
    )
    assert call["argv"] == ["get-credentials", "--v=2"]
    assert call["env"] == {
        "PINHOOK_TEST_INHERITED": "from pinhook",
        "PINHOOK_TEST_OVERRIDDEN": "from config",
        "PINHOOK_TEST_ADDED": "yes",
    }


@pytest.mark.parametrize(
    ("match", "image", "runs"),
    [
        ("docker.io", "nginx", True),  # the normalised name, without tag
        ("index.docker.io", "nginx", False),
        ("*.dkr.ecr.*.amazonaws.com", "123.dkr.ecr.us-east-1.amazonaws.com/app:1", True),
        ("*.dkr.ecr.*.amazonaws.com", "dkr.ecr.us-east-1.amazonaws.com/app:1", False),
        ("registry.io:5000", "registry.io/app", False),
        ("registry.io", "registry.io:5000/app", False),
        ("registry.io/team", "registry.io/teamwork/app", True),  # a plain string prefix
        ("https://registry.io", "registry.io/app", False),  # valid, but never matches
    ],
)
async def test_a_provider_runs_only_for_images_its_match_images_match(
    providers: Make, fake: Program, match: str, image: str, runs: bool
) -> None:
    fake.answer(provider_response({}))
    await providers(spec("fake", match)).lookup(ref(image), deadline())
    assert len(fake.calls) == int(runs)


@pytest.mark.parametrize(
    "answer",
    [
        provider_response(
            {"r.io": ("u", "p")}, api_version="credentialprovider.kubelet.k8s.io/v1beta1"
        ),
        {"response": {**provider_response({"r.io": ("u", "p")})["response"], "kind": "Other"}},
        provider_response({"r.io": ("u", "p")}, extra=1),
        provider_response({"r.io": ("u", "p")}, key_type="image"),
        provider_response({"r.io": ("u", "p")}, key_type=""),
        provider_response({"r.io": ("u", "p")}, duration="6 hours"),
        {"response": {**provider_response({})["response"], "cacheDuration": 3600}},
        {"response": {**provider_response({})["response"], "auth": {"r.io": {"user": "u"}}}},
        {"raw": f"apiVersion: {V1}\nkind: CredentialProviderResponse\n"},  # YAML
        {"raw": '{"apiVersion": "credentialprovider.kubelet.k8s.io/v1", "apiVersion": "x"}'},
        {"raw": ""},
        {"exit": 1, "stderr": "no instance profile"},
    ],
)
async def test_a_malformed_or_failed_answer_gives_no_credentials_and_is_not_cached(
    providers: Make, fake: Program, answer: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    fake.answer(answer)
    made = providers(on_exec=metrics.credential_provider_exec)
    assert await made.lookup(ref("r.io/app"), deadline()) == []
    assert await made.lookup(ref("r.io/app"), deadline()) == []
    assert len(fake.calls) == 2
    assert "credential provider fake for r.io/app" in caplog.text
    rendered = metrics.render().decode()
    assert 'pinhook_credential_provider_execs_total{provider="fake",result="error"} 2.0' in rendered


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            f'{{"apiVersion":"{V1}","kind":"CredentialProviderResponse","cacheKeyType":"Image",'
            '"cacheKeyType":"Global"}',
            "duplicate field",
        ),
        (
            f'{{"ApiVersion":"{V1}","kind":"CredentialProviderResponse","cacheKeyType":"Image"}}',
            "unknown field 'ApiVersion'",
        ),
        (
            f'{{"apiVersion":"{V1}","kind":"CredentialProviderResponse","cacheKeyType":"Image",'
            '"auth":{"r.io":{"username":"u","password":"SECRET"}},"x":1}',
            "unknown field 'x'",
        ),
        (
            f'{{"apiVersion":"{V1}","kind":"CredentialProviderResponse","cacheKeyType":"Image"}} x',
            "not one JSON object",
        ),
    ],
)
def test_responses_are_decoded_strictly(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        parse_response(text.encode(), V1)
    assert "SECRET" not in str(caught.value)


def test_a_good_response_is_read() -> None:
    text = json.dumps(
        provider_response({"*.io": ("u", "p"), "x.io": ("", "")}, duration="1h30m")["response"]
    )
    response = parse_response(text.encode(), V1)
    assert response.cache_key_type == "Registry"
    assert response.cache_seconds == 5400.0
    assert response.auth == (("*.io", "u", "p"), ("x.io", "", ""))
    empty = parse_response(
        json.dumps({**json.loads(text), "auth": None, "cacheDuration": None}).encode(), V1
    )
    assert (empty.auth, empty.cache_seconds) == ((), None)


async def test_auth_keys_are_matched_against_the_image(providers: Make, fake: Program) -> None:
    fake.answer(
        provider_response(
            {
                "other.io": ("other", "p"),
                "r.io/team": ("team", "p"),
                "https://r.io/v2/": ("host", "p"),
                "*.io": ("glob", "p"),
                "r.io:5000": ("port", "p"),
            },
            key_type="Global",
        )
    )
    made = providers(spec("fake", "*.io", "*.io:5000"))
    found = await made.lookup(ref("r.io/team/app"), deadline())
    assert [c.username for c in found] == ["team", "host", "glob"]
    assert {c.source for c in found} == {"credential provider fake"}
    assert [c.username for c in await made.lookup(ref("r.io:5000/a"), deadline())] == ["port"]


async def test_a_slow_provider_is_killed_at_its_time_limit(
    providers: Make, fake: Program, tmp_path: Path
) -> None:
    metrics = Metrics()
    gate = Gate(tmp_path)  # never released
    fake.answer({**provider_response({"r.io": ("u", "p")}), "gate": str(gate.gate_path)})
    made = providers(timeout=1.0, on_exec=metrics.credential_provider_exec)
    # Returns when the time limit kills it, well before the lookup's own deadline.
    assert await made.lookup(ref("r.io/app"), deadline(30)) == []
    (call,) = fake.calls
    with pytest.raises(ProcessLookupError):
        os.kill(call["pid"], 0)
    assert 'pinhook_credential_provider_execs_total{provider="fake",result="timeout"} 1.0' in (
        metrics.render().decode()
    )


async def test_a_lookup_waits_no_longer_than_its_deadline_and_the_answer_is_kept(
    providers: Make, fake: Program, tmp_path: Path
) -> None:
    gate = Gate(tmp_path)
    fake.answer(gate.hold(provider_response({"r.io": ("u", "p")})))
    made = providers()
    first = asyncio.create_task(made.lookup(ref("r.io/app"), deadline(0.3)))
    await gate.started()
    with pytest.raises(DeadlineExceeded, match=r"credential provider fake for r\.io/app"):
        await first
    # The exec goes on; a later lookup joins it, and then the answer is cached.
    second = asyncio.create_task(made.lookup(ref("r.io/app"), deadline()))
    await gate.release()
    assert pairs(await second) == [("u", "p")]
    assert pairs(await made.lookup(ref("r.io/app"), deadline())) == [("u", "p")]
    assert len(fake.calls) == 1


async def test_concurrent_lookups_of_one_image_share_one_exec(
    providers: Make, fake: Program, tmp_path: Path
) -> None:
    gate = Gate(tmp_path)
    fake.answer(gate.hold(provider_response({"r.io": ("u", "p")}, duration="0s")))
    made = providers()
    lookups = [asyncio.create_task(made.lookup(ref("r.io/app"), deadline())) for _ in range(20)]
    await gate.started()
    await gate.release()
    assert all(pairs(found) == [("u", "p")] for found in await asyncio.gather(*lookups))
    assert len(fake.calls) == 1


# -- the cache ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_type", "again", "execs"),
    [
        ("Image", ["r.io/app", "r.io/app:2"], 1),  # the name is the key: tags share it
        ("Image", ["r.io/other"], 2),
        ("Registry", ["r.io/other", "r.io/a/b"], 1),
        ("Registry", ["s.io/app"], 2),
        ("Global", ["s.io/app", "t.io/x"], 1),
    ],
)
async def test_answers_are_cached_by_their_cache_key_type(
    providers: Make, fake: Program, key_type: str, again: list[str], execs: int
) -> None:
    fake.answer(provider_response({"*.io": ("u", "p")}, key_type=key_type))
    made = providers()
    await made.lookup(ref("r.io/app:1"), deadline())
    for image in again:
        assert pairs(await made.lookup(ref(image), deadline())) == [("u", "p")]
    assert len(fake.calls) == execs


@pytest.mark.parametrize(
    ("duration", "default", "cached_for"),
    [
        ("0s", 3600.0, None),  # 0 = not cached
        (None, 0.0, None),  # no duration and a default of 0: not cached
        ("-1s", 3600.0, None),
        (None, 600.0, 600.0),  # no duration: the provider's default
        ("90s", 3600.0, 90.0),
    ],
)
async def test_the_cache_duration(
    providers: Make,
    fake: Program,
    duration: str | None,
    default: float,
    cached_for: float | None,
) -> None:
    clock = Clock()
    fake.answer(provider_response({"r.io": ("u", "p")}, duration=duration))
    made = providers(spec(default=default), clock=clock)
    await made.lookup(ref("r.io/app"), deadline())
    if cached_for is None:
        await made.lookup(ref("r.io/app"), deadline())
        assert len(fake.calls) == 2
        return
    clock.now += cached_for
    await made.lookup(ref("r.io/app"), deadline())
    assert len(fake.calls) == 1  # still valid at its very end
    clock.now += 0.001
    await made.lookup(ref("r.io/app"), deadline())
    assert len(fake.calls) == 2


async def test_the_cache_is_read_image_then_registry_then_global(
    bin_dir: Path, fake: Program
) -> None:
    clock = Clock()
    fake.answer(
        provider_response({"*.io": ("image", "p")}, key_type="Image"),
        provider_response({"*.io": ("registry", "p")}, key_type="Registry"),
        provider_response({"*.io": ("global", "p")}, key_type="Global"),
    )
    made = CredentialProviders([spec()], bin_dir, clock=clock)
    found = []
    for image in ("a.io/x", "a.io/y", "b.io/z"):  # three misses: Image, Registry, Global
        found.append(await made.lookup(ref(image), deadline()))
    assert [c.username for (c,) in found] == ["image", "registry", "global"]
    lookups = {
        "a.io/x": "image",  # image first
        "a.io/other": "registry",  # then registry
        "c.io/any": "global",  # then global
    }
    for image, user in lookups.items():
        assert [c.username for c in await made.lookup(ref(image), deadline())] == [user]
    assert len(fake.calls) == 3


async def test_no_exec_on_the_hot_path_once_cached(providers: Make, fake: Program) -> None:
    fake.answer(provider_response({"r.io": ("u", "p")}, key_type="Registry"))
    made = providers()
    await made.lookup(ref("r.io/app"), deadline())
    for i in range(200):
        await made.lookup(ref(f"r.io/app{i % 7}"), deadline())
    assert len(fake.calls) == 1


async def test_providers_answer_together_in_config_order(bin_dir: Path, fake: Program) -> None:
    second = Program(bin_dir / "second")
    fake.answer(provider_response({"r.io": ("first", "p")}))
    second.answer(provider_response({"r.io": ("second", "p"), "r.io/app": ("second-app", "p")}))
    made = CredentialProviders([spec(), spec("second")], bin_dir, clock=Clock())
    found = await made.lookup(ref("r.io/app"), deadline())
    # One keyring: the more specific key first, then one key's credentials in config order.
    assert [c.username for c in found] == ["second-app", "first", "second"]


# -- against the real registry with token auth ---------------------------------------------


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[[Any], Any]]:
    clients: list[RegistryClient] = []

    async def make(settings: Any) -> RegistryClient:
        client = RegistryClient(registry_options(settings))
        await client.__aenter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


async def test_a_provider_credential_pins_an_image_behind_token_auth(
    token_registry: RegistryEnv, bin_dir: Path, fake: Program, client_for: Any
) -> None:
    pushed = token_registry.push.index("provider/app", "1.0")
    settings = token_settings(token_registry)
    client = await client_for(settings)
    image = ref(pushed.tag_ref)
    fake.answer(provider_response({token_registry.host: ("bob", "builder")}))
    made = CredentialProviders([spec("fake", token_registry.host)], bin_dir)
    resolver = RegistryDigestResolver(client, NoPullSecrets(), None, made)
    resolution = await resolver.resolve(image, PullScope("apps"), deadline())
    assert resolution.digest == pushed.digest
    # Without the provider, the same image is refused.
    plain = RegistryDigestResolver(client, NoPullSecrets())
    with pytest.raises(Unauthorized):
        await plain.resolve(
            ref(f"{token_registry.host}/provider/app:1.0"), PullScope("x"), deadline()
        )


async def test_credentials_come_in_the_kubelets_order(
    token_registry: RegistryEnv, bin_dir: Path, fake: Program, client_for: Any
) -> None:
    pushed = token_registry.push.index("order/app", "1")
    host = token_registry.host

    def auths(username: str, source: str) -> DockerKeyring:
        document = {"auths": {host: {"username": username, "password": "wrong"}}}
        return DockerKeyring.from_dockerconfigjson(json.dumps(document).encode(), source=source)

    fake.answer(provider_response({host: ("bob", "builder")}))
    resolver = RegistryDigestResolver(
        await client_for(token_settings(token_registry)),
        StaticPullSecrets({("apps", "regcred"): auths("from-secret", "secret apps/regcred")}),
        DockerConfig(auths("from-docker-config", "docker config")),
        CredentialProviders([spec("fake", host)], bin_dir),
    )
    assert token_registry.issuer is not None
    token_registry.issuer.reset_counts()
    scope = PullScope("apps", PullContext(("regcred",)))
    resolution = await resolver.resolve(ref(pushed.tag_ref), scope, deadline())
    assert resolution.digest == pushed.digest
    # The token service saw them in the kubelet's order: pull secret, node config, plugin.
    tried = [r.username for r in token_registry.issuer.requests if r.username]
    assert tried == ["from-secret", "from-docker-config", "bob"]


async def test_the_runtime_reads_the_provider_settings(
    token_registry: RegistryEnv, bin_dir: Path, fake: Program, tmp_path: Path
) -> None:
    pushed = token_registry.push.index("runtime/app", "2")
    config = tmp_path / "providers.yaml"
    config.write_text(
        CONFIG_YAML.replace("ecr-credential-provider", "fake")
        .replace('"*.dkr.ecr.*.amazonaws.com"', f'"{token_registry.host}"')
        .replace('"*.dkr.ecr.*.amazonaws.com.cn"', '"example.com"')
    )
    fake.answer(provider_response({token_registry.host: ("bob", "builder")}))
    settings = token_settings(
        token_registry,
        f"  imageCredentialProviderConfig: {config}\n  imageCredentialProviderBinDir: {bin_dir}\n",
    )
    async with Runtime(settings) as runtime:
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": pushed.tag_ref}]},
        }
        outcome = await runtime.mutator.review(parse_review(orjson.dumps(review(pod))))
        assert any(pushed.digest in str(op["value"]) for op in outcome.patch), outcome.warnings
        rendered = runtime.metrics.render().decode()
        assert (
            'pinhook_credential_provider_execs_total{provider="fake",result="ok"} 1.0' in rendered
        )
    (call,) = fake.calls
    assert call["argv"] == ["get-credentials"]


def test_provider_settings_go_together() -> None:
    with pytest.raises(ConfigError, match="go together"):
        load_settings("registry:\n  imageCredentialProviderConfig: /etc/providers.yaml\n")


async def test_a_bad_provider_config_stops_the_runtime_with_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "providers.yaml"
    config.write_text(CONFIG_YAML.replace("12h", "12x"))
    settings = load_settings(
        f"registry:\n  imageCredentialProviderConfig: {config}\n"
        f"  imageCredentialProviderBinDir: {tmp_path}\n"
    )
    with pytest.raises(ConfigError, match="unknown unit"):
        async with Runtime(settings):
            pass


def test_logs_never_hold_provider_credentials(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ValueError, match="unknown field 'bogus'") as caught:
        parse_response(
            json.dumps(
                {**provider_response({"r.io": ("user", "SECRET")})["response"], "bogus": 1}
            ).encode(),
            V1,
        )
    assert "SECRET" not in str(caught.value)


def test_a_match_image_with_a_scheme_is_warned_about(
    bin_dir: Path, fake: Program, caplog: pytest.LogCaptureFixture
) -> None:
    CredentialProviders([spec("fake", "https://registry.io", "registry.io")], bin_dir)
    assert "'https://registry.io' has a scheme and matches no image" in caplog.text
