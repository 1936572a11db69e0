"""The HTTPS server: uvicorn with a reloadable TLS context, config and certificate watchers."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from .app import create_app
from .runtime import Runtime
from .tls import ReloadingTLS


@dataclass(frozen=True, slots=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8443
    cert: Path = Path("certs/tls.crt")
    key: Path = Path("certs/tls.key")
    watch_interval: float = 2.0
    log_level: str = "info"


class _TLSConfig(uvicorn.Config):
    """uvicorn builds its SSLContext from file names in ``load``; give it ours instead."""

    def __init__(self, app: Any, tls: ReloadingTLS, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._tls = tls

    def load(self) -> None:
        super().load()
        self.ssl: ssl.SSLContext | None = self._tls.context


Background = Callable[[], Coroutine[Any, Any, None]]


def build_server(
    runtime: Runtime, options: ServeOptions, background: Sequence[Background] = ()
) -> uvicorn.Server:
    """The server; ``background`` jobs (certificate renewal) run while it serves."""
    tls = ReloadingTLS(options.cert, options.key)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with runtime:
            tasks = [
                asyncio.create_task(runtime.watch_config(options.watch_interval)),
                asyncio.create_task(_watch_certificates(tls, options.watch_interval)),
                *(asyncio.create_task(job()) for job in background),
            ]
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                for task in tasks:
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    app = create_app(runtime, lifespan)
    config = _TLSConfig(
        app,
        tls,
        host=options.host,
        port=options.port,
        log_level=options.log_level,
        access_log=False,
        lifespan="on",
        server_header=False,
        # uvicorn checks that a TLS server has a cert file; ours comes from ReloadingTLS.
        ssl_certfile=str(options.cert),
        ssl_keyfile=str(options.key),
        timeout_graceful_shutdown=10,
    )
    return uvicorn.Server(config)


async def _watch_certificates(tls: ReloadingTLS, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        tls.reload_if_changed()
