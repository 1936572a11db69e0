"""A Mutator resolving through a real registry, on a clock the test moves."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

from webhook.config import load_settings
from webhook.kube import NoPullSecrets
from webhook.metrics import Metrics
from webhook.mutate import Mutator
from webhook.oci.registry import RegistryClient
from webhook.owners import OwnerPins
from webhook.resolve import CachingResolver, RegistryDigestResolver
from webhook.runtime import registry_options


class Clock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


async def registry_mutator(
    stack: AsyncExitStack, host: str, clock: Clock, extra: str = ""
) -> Mutator:
    """Digests cached 60 s (failures 30 s) by ``clock``; ``extra``: more config."""
    settings = load_settings(
        f'registry:\n  insecure: ["{host}"]\n  allowedHosts: ["{host}"]\n'
        f"cache:\n  ttlSeconds: 60\n  negativeTtlSeconds: 30\n{extra}"
    )
    client = await stack.enter_async_context(RegistryClient(registry_options(settings)))
    inner = RegistryDigestResolver(client, NoPullSecrets())
    cache = CachingResolver(inner, settings.cache, clock=clock)
    metrics = Metrics()
    owners = OwnerPins(settings.cache.owner_pinning, 100, metrics=metrics, clock=clock)
    return Mutator(settings, cache, metrics, owners)
