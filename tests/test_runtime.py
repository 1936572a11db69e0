"""The running webhook's state: config reload, credential rotation, clients closed on exit."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.harness.fixtures import RegistryEnv, docker_config
from tests.harness.redisserver import RunningRedis
from tests.reviews import review
from tests.test_sharedcache import eventually
from webhook.admission import parse_review
from webhook.config import RedisSettings, load_settings_file
from webhook.oci.registry import RegistryClient
from webhook.oci.transport import RegistryOptions
from webhook.resolve import StaticDigestResolver
from webhook.runtime import Runtime, _Resolving
from webhook.sharedcache import RedisSharedCache


def write_config(path: Path, host: str, extra: str = "", registry: str = "") -> Path:
    path.write_text(
        f'registry:\n  insecure: ["{host}"]\n  allowedHosts: ["{host}"]\n{registry}'
        "cache:\n  negativeTtlSeconds: 0\n" + extra
    )
    return path


def pod(image: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": image}]},
    }


async def pinned(runtime: Runtime, image: str) -> bool:
    request = parse_review(orjson.dumps(review(pod(image))))
    outcome = await runtime.mutator.review(request)
    return any("@sha256:" in op["value"] for op in outcome.patch)


async def test_reload_with_unreadable_docker_config_is_rejected(
    registry: RegistryEnv, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.yaml", registry.host)
    async with Runtime(load_settings_file(config), config_path=config) as runtime:
        before = runtime.mutator
        write_config(config, registry.host, registry="  dockerConfig: /nonexistent/config.json\n")
        assert not await runtime.reload_config()
        assert runtime.mutator is before
        ready, reason = runtime.readiness()
        assert ready and "rejected" in reason and "/nonexistent" in reason
        assert "pinhook_config_last_reload_valid 0.0" in runtime.metrics.render().decode()
        write_config(config, registry.host, "output: digest-only\n")
        assert await runtime.reload_config()
        assert runtime.readiness() == (True, "ok")


async def test_rotated_docker_config_is_followed(
    basic_registry: RegistryEnv, tmp_path: Path
) -> None:
    pushed = basic_registry.push.index("rotate/app", "1")
    creds_dir = tmp_path / "creds"
    creds_dir.mkdir()
    creds = docker_config(creds_dir, {basic_registry.host: ("alice", "expired")})
    config = write_config(tmp_path / "config.yaml", basic_registry.host)
    settings = load_settings_file(config)
    async with Runtime(settings, config_path=config, docker_config=creds) as runtime:
        assert not await pinned(runtime, pushed.tag_ref)
        replacement = tmp_path / "new"
        replacement.mkdir()
        docker_config(replacement, {basic_registry.host: ("alice", "wonderland")}).replace(creds)
        runtime.reload_docker_config()
        assert await pinned(runtime, pushed.tag_ref)


async def test_replaced_registry_clients_are_closed_on_exit(
    registry: RegistryEnv, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "config.yaml", registry.host)
    runtime = Runtime(load_settings_file(config), config_path=config)
    async with runtime:
        first = runtime._resolving.client
        write_config(config, registry.host, registry="  maxAttempts: 2\n")
        assert await runtime.reload_config()
        assert runtime._resolving.client is not first
        assert (
            first is not None and not first._transport.http.is_closed
        )  # in-flight requests may use it
    assert first._transport.http.is_closed
    last = runtime._resolving.client
    assert last is not None and last._transport.http.is_closed


async def test_a_config_directory_reloads_when_a_file_is_added(
    registry: RegistryEnv, tmp_path: Path
) -> None:
    # The ConfigMap volume: a component or the operator adds a key, the kubelet adds a file.
    directory = tmp_path / "config"
    directory.mkdir()
    write_config(directory / "config.yaml", registry.host)
    async with Runtime(load_settings_file(directory), config_path=directory) as runtime:
        assert not await runtime.reload_config()
        assert not runtime.settings.require_digest
        (directory / "enforce.yaml").write_text("requireDigest: true\n")
        assert await runtime.reload_config()
        assert runtime.settings.require_digest
        # A file that contradicts another is rejected; the last good merge keeps serving.
        (directory / "more.yaml").write_text("requireDigest: false\n")
        assert not await runtime.reload_config()
        assert runtime.settings.require_digest
        ready, reason = runtime.readiness()
        assert ready and "requireDigest is set in both" in reason


class _FailsToClose(RegistryClient):
    async def aclose(self) -> None:
        await super().aclose()
        raise RuntimeError("the registry client failed to close")


async def test_the_shared_cache_is_closed_when_the_registry_client_fails_to_close() -> None:
    # Before: an exception from the client's aclose skipped the shared cache's, leaving its
    # channel subscription and connections open.
    with RunningRedis() as redis_server:
        shared = RedisSharedCache(RedisSettings(url=redis_server.url, timeout_seconds=1))
        await shared.__aenter__()
        await eventually(lambda: shared.subscribed, "subscribed")
        resolving = _Resolving(StaticDigestResolver({}), _FailsToClose(RegistryOptions()), shared)
        with pytest.raises(RuntimeError, match="failed to close"):
            await resolving.aclose()
        assert resolving.client is not None and resolving.client._transport.http.is_closed
        assert not shared.subscribed
