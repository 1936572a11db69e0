"""Keep the backstop ValidatingAdmissionPolicy in step with the live config.

The policy is generated from the config (which kinds are pinned, where ``requireDigest``
applies, which namespaces are excluded): one installed from manifests generated for other
settings would deny objects pinhook lets through, or miss some it should check. A
self-managed pinhook already patches its own webhook configuration (``conditionsync``); on
start and after every accepted config it also patches the policy of the same name to what the
config generates, when there is one. It never creates one (that would take RBAC to create any
admission policy in the cluster): the enforce component installs it, and a config that
enforces nothing keeps it installed but disarmed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from lightkube import AsyncClient
from lightkube.resources.admissionregistration_v1 import ValidatingAdmissionPolicy
from lightkube.types import PatchType

from .config import Settings
from .kubeerrors import KubeNotFound, KubeRefused, as_kube_error, kube_errors
from .validatingpolicy import policy_object

log = logging.getLogger(__name__)


def covers(live: Any, wanted: Any) -> bool:
    """Whether ``live`` holds everything of ``wanted``; fields the API server defaulted
    (absent from ``wanted``) are ignored."""
    if isinstance(wanted, dict):
        return isinstance(live, dict) and all(
            key in live and covers(live[key], value) for key, value in wanted.items()
        )
    if isinstance(wanted, list):
        return (
            isinstance(live, list)
            and len(live) == len(wanted)
            and all(covers(have, want) for have, want in zip(live, wanted, strict=True))
        )
    return bool(live == wanted)


class PolicySync:
    """Called with each accepted config; patches the live policy ``name`` to match."""

    def __init__(
        self, client_factory: Callable[[], AsyncClient], name: str, namespace: str | None
    ) -> None:
        self._client_factory = client_factory
        self._client: AsyncClient | None = None
        self._name = name
        self._namespace = namespace

    async def __call__(self, settings: Settings) -> bool:
        """True when a patch was applied. Failures are logged, never raised: the policy
        stays as it is, and pinhook serves on."""
        what = f"ValidatingAdmissionPolicy {self._name}"
        wanted = policy_object(settings, name=self._name, own_namespace=self._namespace)["spec"]
        try:
            with kube_errors(what):
                if self._client is None:
                    self._client = self._client_factory()
                try:
                    live = await self._client.get(ValidatingAdmissionPolicy, self._name)
                except Exception as exc:
                    if isinstance(as_kube_error(exc, what), KubeNotFound | KubeRefused):
                        # The base installs no policy and grants no access to one.
                        log.debug("%s not kept in step: %s", what, exc)
                        return False
                    raise
                if covers(live.to_dict().get("spec"), wanted):
                    return False
                patch = [{"op": "replace", "path": "/spec", "value": wanted}]
                await self._client.patch(
                    ValidatingAdmissionPolicy, self._name, patch, patch_type=PatchType.JSON
                )
        except Exception as exc:  # whatever the client raises: it must not stop serving
            log.warning(
                "%s not updated (it enforces the previous config until the next config change"
                " or restart): %s",
                what,
                exc,
            )
            return False
        log.info("%s updated to the new config", what)
        return True

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
