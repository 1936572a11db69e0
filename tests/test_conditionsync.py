"""The matchConditions sync never stops a start or a reload, whatever the API client does."""

from __future__ import annotations

from lightkube import AsyncClient

from webhook.conditionsync import MatchConditionsSync, conditions_patch
from webhook.config import load_settings
from webhook.errors import ConfigError
from webhook.kinds import kind_info
from webhook.webhookconfig import match_conditions_for


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
