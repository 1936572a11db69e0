"""Keep the webhook configuration's matchConditions in step with the live config.

The conditions are generated from the rewrite rules: a rule added to the ConfigMap would never
see the objects the old conditions keep away (pinned images it should move, runtimes it should
rewrite). A self-managed pinhook already patches its own MutatingWebhookConfiguration (the
caBundle), so on start and after every accepted config it also rewrites each webhook's
``matchConditions`` to what the new config generates. Only conditions are touched, and only
on webhooks that have them: rules stay as installed, and a configuration installed without
conditions (clusters older than 1.28) stays without.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from lightkube import AsyncClient
from lightkube.resources.admissionregistration_v1 import MutatingWebhookConfiguration
from lightkube.types import PatchType

from .config import Settings
from .kinds import KINDS, KindInfo
from .kubeerrors import kube_errors
from .webhookconfig import match_conditions_for

log = logging.getLogger(__name__)


class ConfigSync(Protocol):
    """Something in the cluster kept in step with each accepted config (``Runtime``)."""

    async def __call__(self, settings: Settings) -> bool: ...

    async def aclose(self) -> None: ...


_KIND_BY_WEBHOOK: Mapping[str, KindInfo] = {info.webhook_name: info for info in KINDS}


def conditions_patch(
    webhooks: Sequence[Mapping[str, Any]], settings: Settings
) -> list[dict[str, Any]]:
    """JSON patch ops bringing each known webhook's matchConditions to ``settings``.

    Each replace is guarded by a ``test`` of the webhook's name, so a list reordered since it
    was read is refused (422) rather than patched in the wrong place.
    """
    ops: list[dict[str, Any]] = []
    for index, webhook in enumerate(webhooks):
        info = _KIND_BY_WEBHOOK.get(str(webhook.get("name")))
        current = webhook.get("matchConditions")
        if info is None or not current:
            continue
        wanted = match_conditions_for(settings, info)
        if current == wanted:
            continue
        ops.append({"op": "test", "path": f"/webhooks/{index}/name", "value": webhook["name"]})
        ops.append({"op": "replace", "path": f"/webhooks/{index}/matchConditions", "value": wanted})
    return ops


class MatchConditionsSync:
    """Called with each accepted config; patches the live webhook configuration to match."""

    def __init__(self, client_factory: Callable[[], AsyncClient], webhook_config: str) -> None:
        self._client_factory = client_factory
        self._client: AsyncClient | None = None
        self._name = webhook_config

    async def __call__(self, settings: Settings) -> bool:
        """True when a patch was applied. Failures are logged, never raised: the webhook
        serves on with the conditions it has."""
        try:
            with kube_errors(f"MutatingWebhookConfiguration {self._name}"):
                if self._client is None:
                    self._client = self._client_factory()
                live = await self._client.get(MutatingWebhookConfiguration, self._name)
                webhooks = [webhook.to_dict() for webhook in live.webhooks or ()]
                ops = conditions_patch(webhooks, settings)
                if not ops:
                    return False
                await self._client.patch(
                    MutatingWebhookConfiguration, self._name, ops, patch_type=PatchType.JSON
                )
        except Exception as exc:  # whatever the client raises: it must not stop serving
            log.warning(
                "matchConditions of %s not updated (objects the new rules match may not reach"
                " pinhook until the next config change or restart): %s",
                self._name,
                exc,
            )
            return False
        log.info("matchConditions of %s updated to the new config", self._name)
        return True

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
