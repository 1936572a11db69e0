"""The syncs of the matchConditions and of the backstop policy never stop a start or a reload,
whatever the API client does."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from lightkube import AsyncClient, KubeConfig
from lightkube.config.models import Cluster, User

from tests.fake_apiserver import FakeApiServer
from webhook.conditionsync import MatchConditionsSync, conditions_patch
from webhook.config import load_settings
from webhook.errors import ConfigError
from webhook.kinds import kind_info
from webhook.policysync import PolicySync, covers
from webhook.validatingpolicy import armed, policy_object
from webhook.webhookconfig import match_conditions_for

ENFORCE = load_settings("requireDigest: true")


def no_kubeconfig() -> AsyncClient:
    raise ConfigError("no Kubernetes API configuration found")


async def test_client_errors_are_logged_not_raised() -> None:
    sync = MatchConditionsSync(no_kubeconfig, "pinhook")
    assert await sync(load_settings("")) is False
    await sync.aclose()


def test_patch_touches_only_known_webhooks_with_conditions() -> None:
    pods = kind_info("", "Pod")
    assert pods is not None
    settings = load_settings("")
    current = match_conditions_for(load_settings("builtinRewrites: false"), pods)
    webhooks = [
        {"name": "other.example.com", "matchConditions": current},
        {"name": "pods.pinhook.dev"},
        {"name": "pods.pinhook.dev", "matchConditions": current},
        {"name": "pods.pinhook.dev", "matchConditions": match_conditions_for(settings, pods)},
    ]
    assert conditions_patch(webhooks, settings) == [
        {"op": "test", "path": "/webhooks/2/name", "value": "pods.pinhook.dev"},
        {
            "op": "replace",
            "path": "/webhooks/2/matchConditions",
            "value": match_conditions_for(settings, pods),
        },
    ]


# --- the backstop policy ---------------------------------------------------------------------


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    fake = FakeApiServer()
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def client_factory(api: FakeApiServer) -> AsyncIterator[Callable[[], AsyncClient]]:
    clients: list[AsyncClient] = []

    def make() -> AsyncClient:
        config = KubeConfig.from_one(cluster=Cluster(server=api.url), user=User(token="t"))
        clients.append(AsyncClient(config=config, trust_env=False))
        return clients[-1]

    yield make
    for client in clients:
        await client.close()


def _installed(settings_text: str) -> dict[str, Any]:
    """A policy as the API server keeps it: generated, with defaulted fields added."""
    policy = policy_object(load_settings(settings_text))
    policy["spec"]["matchConstraints"] |= {"namespaceSelector": {}, "objectSelector": {}}
    for rule in policy["spec"]["matchConstraints"]["resourceRules"]:
        rule["resourceNames"] = []
    policy["spec"]["auditAnnotations"] = []
    return policy


def _patches(api: FakeApiServer) -> int:
    return sum(request.method == "PATCH" for request in api.requests)


def test_covers_ignores_what_the_api_server_defaulted() -> None:
    wanted = policy_object(ENFORCE)["spec"]
    assert covers(_installed("requireDigest: true")["spec"], wanted)
    assert not covers(_installed("requireDigest: false")["spec"], wanted)
    assert not covers({"validations": [*wanted["validations"], {}]}, wanted)
    assert covers({"a": [1, {"b": 2, "c": 3}]}, {"a": [1, {"b": 2}]})
    assert not covers({"a": [1]}, {"a": [1, 2]})


async def test_the_policy_is_patched_to_the_served_config(
    api: FakeApiServer, client_factory: Callable[[], AsyncClient]
) -> None:
    api.put(_installed("requireDigest: true"))
    sync = PolicySync(client_factory, "pinhook", "pinhook-system")
    try:
        assert await sync(ENFORCE) is False  # already what the config generates
        assert _patches(api) == 0
        # A namespace's mode alone changes where it enforces: audit there denies nothing.
        audited = load_settings("{requireDigest: true, namespaces: {team-a: {mode: audit}}}")
        assert await sync(audited) is True
        live = api.get("validatingadmissionpolicies", "", "pinhook")
        assert live is not None
        assert "'team-a'" in live["spec"]["matchConditions"][0]["expression"]
        settings = load_settings(
            "{requireDigest: true, excludedNamespaces: [ci], kinds: {deployments.apps: pin}}"
        )
        assert await sync(settings) is True
        live = api.get("validatingadmissionpolicies", "", "pinhook")
        assert live is not None
        assert live["spec"] == policy_object(settings)["spec"]
        assert "'ci'" in live["spec"]["matchConditions"][0]["expression"]
        # Turning requireDigest off disarms it rather than leaving it to deny.
        assert await sync(load_settings("")) is True
        live = api.get("validatingadmissionpolicies", "", "pinhook")
        assert live is not None and not armed(live)
    finally:
        await sync.aclose()


async def test_no_policy_or_no_access_is_quietly_left_alone(
    api: FakeApiServer,
    client_factory: Callable[[], AsyncClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    sync = PolicySync(client_factory, "pinhook", "pinhook-system")
    try:
        with caplog.at_level(logging.INFO, logger="webhook.policysync"):
            assert await sync(ENFORCE) is False  # the base installs none
            api.fail_next("validatingadmissionpolicies", watch=False, status=403)
            assert await sync(ENFORCE) is False  # nor grants access to one
        assert caplog.records == []
        assert _patches(api) == 0
    finally:
        await sync.aclose()


async def test_a_refused_patch_is_logged_not_raised(
    api: FakeApiServer,
    client_factory: Callable[[], AsyncClient],
    caplog: pytest.LogCaptureFixture,
) -> None:
    api.put(_installed(""))
    api.fail_next("validatingadmissionpolicies", watch=False, status=403, method="PATCH")
    sync = PolicySync(client_factory, "pinhook", "pinhook-system")
    try:
        assert await sync(ENFORCE) is False
    finally:
        await sync.aclose()
    [record] = [r for r in caplog.records if r.name == "webhook.policysync"]
    assert record.levelno == logging.WARNING
    assert "ValidatingAdmissionPolicy pinhook not updated" in record.getMessage()
    live = api.get("validatingadmissionpolicies", "", "pinhook")
    assert live is not None and not armed(live)
