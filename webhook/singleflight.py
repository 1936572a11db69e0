"""One call for many concurrent callers of the same key, each waiting under its own deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from .errors import DeadlineExceeded

K = TypeVar("K")
T = TypeVar("T")


class SingleFlight(Generic[K, T]):
    """Concurrent callers with the same key share one call; each waits under its own deadline.

    The call runs to its own end even when every caller gave up, so its result (a digest, a
    credential) can still be cached for the next one.
    """

    def __init__(self) -> None:
        self._calls: dict[K, asyncio.Future[T]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._calls

    async def run(self, key: K, call: Callable[[], Awaitable[T]], deadline: float, what: str) -> T:
        future = self._calls.get(key)
        if future is None:
            future = asyncio.ensure_future(call())
            self._calls[key] = future
            future.add_done_callback(lambda f: self._settle(key, f))
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            # shield: one caller giving up must not cancel the call the others wait on.
            return await asyncio.wait_for(asyncio.shield(future), remaining)
        except TimeoutError:
            raise DeadlineExceeded(f"{what}: no answer within the deadline") from None

    def _settle(self, key: K, future: asyncio.Future[T]) -> None:
        self._calls.pop(key, None)
        if not future.cancelled():
            # Retrieve it so an error nobody waited for (all callers timed out) is not reported
            # as "never retrieved"; every waiter got its own copy already.
            future.exception()
