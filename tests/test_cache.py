"""The digest cache's own rules: TTL, LRU bound, negative entries, singleflight, stale-on-error.

The registry behind it is a scripted resolver here so each rule can be driven exactly; the
same cache against the real registry is covered in test_resolve_registry.py.
"""

from __future__ import annotations

import asyncio

import pytest

from webhook.config import CacheSettings
from webhook.errors import (
    DeadlineExceeded,
    NotFound,
    RegistryUnavailable,
    ResolveError,
    Unauthorized,
)
from webhook.oci.credential import ANONYMOUS, Credential, Credentials
from webhook.oci.reference import ImageRef
from webhook.resolve import CachingResolver, PullScope, Resolution

SCOPE = PullScope("default")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ScriptedRegistry:
    """Answers from a dict; an asyncio.Event can hold answers back; counts calls.

    Each namespace in ``secrets`` pulls with a credential of its own; others anonymously."""

    def __init__(self) -> None:
        self.digests: dict[str, str] = {}
        self.failure: ResolveError | None = None
        self.failures_for: dict[str | None, ResolveError] = {}
        self.secrets: set[str] = set()
        self.release = asyncio.Event()
        self.release.set()
        self.calls = 0

    async def credentials(self, ref: ImageRef, scope: PullScope, deadline: float) -> Credentials:
        if scope.namespace in self.secrets:
            return Credentials((Credential(str(scope.namespace), "secret"),))
        return ANONYMOUS

    async def digest(self, ref: ImageRef, credentials: Credentials, deadline: float) -> str:
        self.calls += 1
        await self.release.wait()
        namespace = credentials.items[0].username if credentials.items else None
        failure = self.failures_for.get(namespace, self.failure)
        if failure is not None:
            raise failure
        try:
            return self.digests[str(ref)]
        except KeyError:
            raise NotFound(f"{ref} not found") from None

    async def has(self, ref: ImageRef, credentials: Credentials, deadline: float) -> bool:
        self.calls += 1
        return ref.digest in self.digests.values()


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


def deadline(seconds: float = 5.0) -> float:
    return asyncio.get_running_loop().time() + seconds


NGINX = ImageRef.parse("nginx:1.27")


@pytest.fixture
def registry() -> ScriptedRegistry:
    scripted = ScriptedRegistry()
    scripted.digests[str(NGINX)] = digest(1)
    return scripted


def cache(registry: ScriptedRegistry, clock: Clock, **settings: float) -> CachingResolver:
    return CachingResolver(registry, CacheSettings(**settings), clock=clock)


async def test_hit_within_ttl_and_new_digest_after(registry: ScriptedRegistry) -> None:
    clock = Clock()
    resolver = cache(registry, clock, ttl_seconds=60)
    assert (await resolver.resolve(NGINX, SCOPE, deadline())).digest == digest(1)
    registry.digests[str(NGINX)] = digest(2)  # the tag moved upstream
    clock.now += 59
    assert (await resolver.resolve(NGINX, SCOPE, deadline())).digest == digest(1)
    clock.now += 2
    assert (await resolver.resolve(NGINX, SCOPE, deadline())).digest == digest(2)
    assert registry.calls == 2


async def test_concurrent_requests_share_one_lookup(registry: ScriptedRegistry) -> None:
    resolver = cache(registry, Clock())
    registry.release.clear()
    waiters = [asyncio.create_task(resolver.resolve(NGINX, SCOPE, deadline())) for _ in range(100)]
    await asyncio.sleep(0)  # let every waiter reach the cache before the answer comes
    registry.release.set()
    results = await asyncio.gather(*waiters)
    assert {r.digest for r in results} == {digest(1)}
    assert registry.calls == 1


async def test_negative_entry_expires_sooner(registry: ScriptedRegistry) -> None:
    clock = Clock()
    resolver = cache(registry, clock, ttl_seconds=300, negative_ttl_seconds=10)
    missing = ImageRef.parse("nginx:9.9")
    for _ in range(3):
        with pytest.raises(NotFound):
            await resolver.resolve(missing, SCOPE, deadline())
    assert registry.calls == 1
    registry.digests[str(missing)] = digest(9)
    clock.now += 11
    assert (await resolver.resolve(missing, SCOPE, deadline())).digest == digest(9)


async def test_stale_on_error_serves_expired_digest(registry: ScriptedRegistry) -> None:
    clock = Clock()
    resolver = cache(registry, clock, ttl_seconds=60)
    await resolver.resolve(NGINX, SCOPE, deadline())
    clock.now += 120
    registry.failure = RegistryUnavailable("503 from registry")
    answer = await resolver.resolve(NGINX, SCOPE, deadline())
    assert answer == Resolution(digest(1), stale=True)


async def test_stale_disabled_or_too_old_raises(registry: ScriptedRegistry) -> None:
    clock = Clock()
    off = cache(registry, clock, ttl_seconds=60, stale_on_error=False)
    await off.resolve(NGINX, SCOPE, deadline())
    clock.now += 120
    registry.failure = RegistryUnavailable("503")
    with pytest.raises(RegistryUnavailable):
        await off.resolve(NGINX, SCOPE, deadline())
    registry.failure = None
    old = cache(registry, clock, ttl_seconds=60, stale_max_seconds=100)
    await old.resolve(NGINX, SCOPE, deadline())
    clock.now += 200
    registry.failure = RegistryUnavailable("503")
    with pytest.raises(RegistryUnavailable):
        await old.resolve(NGINX, SCOPE, deadline())


async def test_bounded_least_recently_used(registry: ScriptedRegistry) -> None:
    resolver = cache(registry, Clock(), max_entries=2)
    refs = [ImageRef.parse(f"app{i}:1") for i in range(3)]
    for i, ref in enumerate(refs):
        registry.digests[str(ref)] = digest(10 + i)
    await resolver.resolve(refs[0], SCOPE, deadline())
    await resolver.resolve(refs[1], SCOPE, deadline())
    await resolver.resolve(refs[0], SCOPE, deadline())  # refs[0] is now the most recent
    await resolver.resolve(refs[2], SCOPE, deadline())  # evicts refs[1]
    assert len(resolver) == 2
    calls = registry.calls
    await resolver.resolve(refs[0], SCOPE, deadline())
    assert registry.calls == calls
    await resolver.resolve(refs[1], SCOPE, deadline())
    assert registry.calls == calls + 1


async def test_waiter_deadline_does_not_cancel_shared_lookup(registry: ScriptedRegistry) -> None:
    resolver = cache(registry, Clock())
    registry.release.clear()
    patient = asyncio.create_task(resolver.resolve(NGINX, SCOPE, deadline(5)))
    with pytest.raises(DeadlineExceeded):
        await resolver.resolve(NGINX, SCOPE, deadline(0.01))
    registry.release.set()
    assert (await patient).digest == digest(1)
    assert registry.calls == 1


async def test_digest_existence_cached_once_seen(registry: ScriptedRegistry) -> None:
    resolver = cache(registry, Clock())
    pinned = NGINX.with_digest(digest(1))
    assert await resolver.exists(pinned, SCOPE, deadline())
    assert await resolver.exists(pinned, SCOPE, deadline())
    assert not await resolver.exists(NGINX.with_digest(digest(7)), SCOPE, deadline())
    assert registry.calls == 2


async def test_failures_and_shared_lookups_are_per_pull_scope(registry: ScriptedRegistry) -> None:
    clock = Clock()
    resolver = cache(registry, clock, negative_ttl_seconds=30)
    without = PullScope("team-a")
    with_secret = PullScope("team-b")
    registry.secrets.add("team-b")
    registry.failure = Unauthorized("no credentials for team-a")
    with pytest.raises(Unauthorized):
        await resolver.resolve(NGINX, without, deadline())
    registry.failure = None
    # team-a's refusal is remembered for team-a only.
    assert (await resolver.resolve(NGINX, with_secret, deadline())).digest == digest(1)
    assert registry.calls == 2


async def test_peek_hits_keep_an_entry_recently_used(registry: ScriptedRegistry) -> None:
    resolver = cache(registry, Clock(), max_entries=2)
    refs = [ImageRef.parse(f"app{i}:1") for i in range(3)]
    for i, ref in enumerate(refs):
        registry.digests[str(ref)] = digest(20 + i)
    await resolver.resolve(refs[0], SCOPE, deadline())
    await resolver.resolve(refs[1], SCOPE, deadline())
    assert resolver.peek(refs[0]) == digest(20)
    await resolver.resolve(refs[2], SCOPE, deadline())  # evicts refs[1], not refs[0]
    assert resolver.peek(refs[0]) == digest(20)
    assert resolver.peek(refs[1]) is None


async def test_stale_digest_served_without_asking_again(registry: ScriptedRegistry) -> None:
    clock = Clock()
    resolver = cache(registry, clock, ttl_seconds=60, negative_ttl_seconds=10)
    await resolver.resolve(NGINX, SCOPE, deadline())
    clock.now += 61
    registry.failure = RegistryUnavailable("503")
    for _ in range(5):
        assert await resolver.resolve(NGINX, SCOPE, deadline()) == Resolution(digest(1), True)
    assert registry.calls == 2  # one success, one failure; the rest came from the cache
    assert resolver.peek(NGINX) is None  # a stale digest always goes out with its warning
    clock.now += 11
    registry.failure = None
    assert await resolver.resolve(NGINX, SCOPE, deadline()) == Resolution(digest(1))
    assert registry.calls == 3


async def test_missing_digest_checked_once_for_concurrent_admissions(
    registry: ScriptedRegistry,
) -> None:
    clock = Clock()
    resolver = cache(registry, clock, negative_ttl_seconds=30)
    gone = NGINX.with_digest(digest(99))
    answers = await asyncio.gather(*(resolver.exists(gone, SCOPE, deadline()) for _ in range(50)))
    assert answers == [False] * 50
    assert not await resolver.exists(gone, SCOPE, deadline())
    assert registry.calls == 1
    clock.now += 31
    await resolver.exists(gone, SCOPE, deadline())
    assert registry.calls == 2


async def test_a_failing_scope_does_not_mark_a_fresh_entry_stale(
    registry: ScriptedRegistry,
) -> None:
    clock = Clock()
    resolver = cache(registry, clock, ttl_seconds=300)
    await resolver.resolve(NGINX, SCOPE, deadline())
    clock.now += 301
    registry.release.clear()
    registry.secrets.add("broken")
    good = asyncio.create_task(resolver.resolve(NGINX, SCOPE, deadline()))
    broken = asyncio.create_task(resolver.resolve(NGINX, PullScope("broken"), deadline()))
    await asyncio.sleep(0)  # both lookups now wait on the registry, the good one first
    registry.digests[str(NGINX)] = digest(2)
    registry.failures_for["broken"] = RegistryUnavailable("503 for this scope")
    registry.release.set()
    assert await good == Resolution(digest(2))
    # The good scope refreshed the entry before the broken one failed: fresh, not stale.
    assert await broken == Resolution(digest(2))
    assert resolver.peek(NGINX) == digest(2)


async def test_shared_lookup_outlives_a_short_first_caller(registry: ScriptedRegistry) -> None:
    resolver = cache(registry, Clock())
    registry.release.clear()
    hurried = asyncio.create_task(resolver.resolve(NGINX, SCOPE, deadline(0.05)))
    patient = asyncio.create_task(resolver.resolve(NGINX, SCOPE, deadline(5)))
    with pytest.raises(DeadlineExceeded):
        await hurried
    registry.release.set()
    assert (await patient).digest == digest(1)
    assert registry.calls == 1


async def test_cached_failures_are_raised_as_fresh_errors(registry: ScriptedRegistry) -> None:
    resolver = cache(registry, Clock(), negative_ttl_seconds=30)
    missing = ImageRef.parse("nginx:0.0")
    raised = []
    for _ in range(3):
        with pytest.raises(NotFound) as caught:
            await resolver.resolve(missing, SCOPE, deadline())
        raised.append(caught.value)
    assert raised[1] is not raised[2]
    assert registry.calls == 1


async def test_a_remembered_failure_keeps_its_message_not_its_exception(
    registry: ScriptedRegistry,
) -> None:
    # Before: each negative entry kept the exception and its traceback, some 8.5 KB; 10,000
    # of them held 80 MiB.
    import tracemalloc

    resolver = cache(registry, Clock(), negative_ttl_seconds=300, max_entries=20_000)
    missing = [ImageRef.parse(f"nginx:gone-{i}") for i in range(2000)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for ref in missing:
        with pytest.raises(NotFound):
            await resolver.resolve(ref, SCOPE, deadline())
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown / len(missing) < 1500  # bytes per remembered failure
    with pytest.raises(NotFound, match="gone-7 not found"):
        await resolver.resolve(missing[7], SCOPE, deadline())
    assert registry.calls == len(missing)
