from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest

pytest_plugins = ["tests.harness.fixtures"]

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, LoopFactory]:
    """Tests marked ``both_loops`` run on asyncio's loop and on uvloop, which pinhook serves
    with in production: their TLS and transport code is separate."""
    factories: dict[str, LoopFactory] = {"asyncio": asyncio.new_event_loop}
    if item.get_closest_marker("both_loops") is not None:
        try:
            import uvloop
        except ImportError:
            return factories
        factories["uvloop"] = uvloop.new_event_loop
    return factories
