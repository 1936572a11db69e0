"""Session-scoped registries for tests: anonymous, htpasswd and token auth.

Registries are real ``docker-registry`` processes. When the binary is missing the fixtures
fail and name ``scripts/ensure-packages``; with ``PINHOOK_SKIP_REGISTRY=1`` they skip instead.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.harness.proxy import CountingProxy
from tests.harness.push import BearerChallengeAuth, Pusher
from tests.harness.registry import (
    RegistryNotInstalled,
    RunningRegistry,
    TokenAuthSettings,
    registry_binary,
)
from tests.harness.tokens import TokenIssuer

SKIP_ENV = "PINHOOK_SKIP_REGISTRY"
BASIC_USER, BASIC_PASSWORD = "alice", "wonderland"
TOKEN_USER, TOKEN_PASSWORD = "bob", "builder"


@dataclass
class RegistryEnv:
    """One running test registry and what a test needs to use it."""

    registry: RunningRegistry
    client: httpx.Client
    username: str | None = None
    password: str | None = None
    issuer: TokenIssuer | None = None
    push: Pusher = field(init=False)

    def __post_init__(self) -> None:
        self.push = Pusher(self.client)

    @property
    def host(self) -> str:
        return self.registry.host

    @property
    def url(self) -> str:
        return self.registry.url

    @property
    def credentials(self) -> tuple[str, str] | None:
        if self.username is None or self.password is None:
            return None
        return self.username, self.password

    def count_requests(self, method: str, path_substring: str) -> int:
        return self.registry.count_requests(method, path_substring)


def require_registry() -> None:
    """Fail (or skip under ``PINHOOK_SKIP_REGISTRY=1``) when docker-registry is missing."""
    try:
        registry_binary()
    except RegistryNotInstalled as error:
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(f"{SKIP_ENV}=1: {error}")
        pytest.fail(str(error), pytrace=False)


def dockerconfigjson(auths: Mapping[str, tuple[str, str]]) -> dict[str, object]:
    """The ``.dockerconfigjson`` document for ``{host: (user, password)}``."""
    return {
        "auths": {
            host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
            for host, (user, password) in auths.items()
        }
    }


def docker_config(
    tmp_path: Path,
    auths: Mapping[str, tuple[str, str]],
    filename: str = ".dockerconfigjson",
) -> Path:
    """Write a ``.dockerconfigjson`` file under ``tmp_path``; returns its path."""
    path = tmp_path / filename
    path.write_text(json.dumps(dockerconfigjson(auths)))
    return path


def _serve(stack: ExitStack, registry: RunningRegistry, auth: httpx.Auth | None) -> httpx.Client:
    stack.enter_context(registry)
    return stack.enter_context(httpx.Client(base_url=registry.url, auth=auth, timeout=10.0))


@pytest.fixture(scope="session")
def registry() -> Iterator[RegistryEnv]:
    """An anonymous registry."""
    require_registry()
    with ExitStack() as stack:
        running = RunningRegistry("none")
        yield RegistryEnv(running, _serve(stack, running, None))


@pytest.fixture(scope="session")
def basic_registry() -> Iterator[RegistryEnv]:
    """A registry with htpasswd auth: alice / wonderland."""
    require_registry()
    with ExitStack() as stack:
        running = RunningRegistry("htpasswd", users={BASIC_USER: BASIC_PASSWORD})
        client = _serve(stack, running, httpx.BasicAuth(BASIC_USER, BASIC_PASSWORD))
        yield RegistryEnv(running, client, BASIC_USER, BASIC_PASSWORD)


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryEnv]:
    """A registry with token auth; its issuer accepts bob / builder and no anonymous."""
    require_registry()
    with ExitStack() as stack:
        issuer = stack.enter_context(TokenIssuer(username=TOKEN_USER, password=TOKEN_PASSWORD))
        bundle = issuer.write_rootcertbundle(tmp_path_factory.mktemp("token") / "issuer.pem")
        settings = TokenAuthSettings(issuer.realm, issuer.service, issuer.issuer, bundle)
        running = RunningRegistry("token", token=settings)
        client = _serve(stack, running, BearerChallengeAuth(TOKEN_USER, TOKEN_PASSWORD))
        yield RegistryEnv(running, client, TOKEN_USER, TOKEN_PASSWORD, issuer)


@pytest.fixture
def registry_proxy(registry: RegistryEnv) -> Iterator[CountingProxy]:
    """A fresh counting proxy in front of the anonymous registry."""
    with CountingProxy(registry.url) as proxy:
        yield proxy
