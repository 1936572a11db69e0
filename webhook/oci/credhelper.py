"""pinhook's own docker config file, read the way docker reads it.

The kubelet reads only ``auths`` from a node's ``config.json``. pinhook's mounted docker config
is its own, so it also honours what ``docker login`` writes, as docker/cli does:

* ``auths`` entries, matched to images as the kubelet matches them (:mod:`.keychain`), with
  ``identitytoken`` and ``registrytoken`` kept on the :class:`Credential`;
* ``credHelpers`` and ``credsStore``: ``docker-credential-<name> get`` is run (found on
  ``PATH``) with the registry's key on stdin: ``https://index.docker.io/v1/`` for Docker Hub,
  ``host[:port]`` for any other registry. ``credHelpers[key]`` wins over ``credsStore``, and
  with either, ``auths`` is not consulted for that registry (docker replaces the file's entry
  with the helper's answer). A helper that exits non-zero printing ``credentials not found in
  native keychain`` has no credential; the username ``<token>`` marks an identity token.

A helper that fails otherwise gives no credential and is logged (once per distinct problem);
the next source of credentials still applies.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..singleflight import SingleFlight
from .command import CommandError, run_command
from .credential import Credential
from .keychain import DockerKeyring, auths_entries, credential_entries, go_fields, load_json
from .reference import DOCKER_HUB, ImageRef

log = logging.getLogger(__name__)

HELPER_PREFIX = "docker-credential-"
# docker/cli's key for Docker Hub in credential stores (``registry.IndexServer``).
DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_NOT_FOUND = "credentials not found in native keychain"
_TOKEN_USERNAME = "<token>"  # noqa: S105 - a marker, not a password
_DOCKER_FIELDS = frozenset({"auths", "credsstore", "credhelpers"})
_WARNED_LIMIT = 256


def helper_key(ref: ImageRef) -> str:
    """The key docker looks a registry up by in ``credHelpers`` and in a helper."""
    return DOCKER_HUB_KEY if ref.registry == DOCKER_HUB else ref.registry


class DockerConfig:
    """A docker config file: its ``auths`` keyring and the helpers it names."""

    def __init__(
        self,
        keyring: DockerKeyring,
        *,
        source: str = "docker config",
        creds_store: str = "",
        cred_helpers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.keyring = keyring
        self.source = source
        self.creds_store = creds_store
        self.cred_helpers = dict(cred_helpers or {})
        self._timeout = timeout
        self._calls: SingleFlight[tuple[str, str], Credential | None] = SingleFlight()
        self._warned: set[str] = set()

    @classmethod
    def from_file(cls, path: Path, *, timeout: float = 10.0) -> DockerConfig:
        """Read a docker config file (``config.json``, or the legacy ``.dockercfg`` form)."""
        source = f"docker config {path}"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read it ({exc.strerror or exc})") from exc
        return cls.from_document(load_json(data, source), source=source, timeout=timeout)

    @classmethod
    def from_document(cls, document: Any, *, source: str, timeout: float = 10.0) -> DockerConfig:
        if document is None:
            document = {}
        if not isinstance(document, dict):
            raise ConfigError(f"{source}: a docker config must be a JSON object")
        fields = list(go_fields(document))
        names = {name for name, _ in fields}
        if not names & _DOCKER_FIELDS and all(isinstance(v, dict) for _, v in fields):
            entries = credential_entries(document, source, tokens=True)  # legacy .dockercfg
        else:
            entries = auths_entries(document, source, tokens=True)
        store, helpers = "", {}
        for name, value in fields:
            if name == "credsstore":
                store = _string(value, '"credsStore"', source)
            elif name == "credhelpers":
                helpers = _string_map(value, '"credHelpers"', source)
        if not entries and not store and not helpers:
            log.warning("%s has no credentials, helpers or credential store", source)
        return cls(
            DockerKeyring(entries),
            source=source,
            creds_store=store,
            cred_helpers=helpers,
            timeout=timeout,
        )

    def helper_for(self, ref: ImageRef) -> str:
        """The helper docker would ask for ``ref``'s registry; empty when it reads ``auths``.

        A ``credHelpers`` entry wins even when empty (docker then reads the file).
        """
        return self.cred_helpers.get(helper_key(ref), self.creds_store)

    async def lookup(self, ref: ImageRef, deadline: float) -> list[Credential]:
        """The credentials docker would use for ``ref``, in order.

        Raises DeadlineExceeded when a helper has not answered by ``deadline``.
        """
        helper = self.helper_for(ref)
        if not helper:
            return self.keyring.lookup(ref)
        key = helper_key(ref)
        credential = await self._calls.run(
            (helper, key),
            lambda: self._ask(helper, key),
            deadline,
            f"{HELPER_PREFIX}{helper} for {key}",
        )
        return [] if credential is None else [credential]

    async def _ask(self, helper: str, key: str) -> Credential | None:
        program = HELPER_PREFIX + helper
        path = shutil.which(program)
        if path is None:
            self._warn(f"{self.source}: {program} is not on PATH; no credentials for {key}")
            return None
        try:
            result = await run_command([path, "get"], key.encode(), time_limit=self._timeout)
        except CommandError as exc:
            self._warn(f"{self.source}: {exc}")
            return None
        out = result.stdout.decode("utf-8", "replace").strip()
        if result.returncode != 0:
            if out != _NOT_FOUND:
                # docker shows a helper's stdout in its error; it is a message, not a secret.
                self._warn(f"{self.source}: {program} get {key} failed: {out[:200]!r}")
            return None
        try:
            return self._credential(helper, out)
        except ValueError as exc:
            self._warn(f"{self.source}: {program} get {key}: {exc}")
            return None

    def _credential(self, helper: str, out: str) -> Credential | None:
        """Read the helper's ``{"ServerURL", "Username", "Secret"}`` (first JSON value only,
        field names in any case, as Go's decoder reads it)."""
        try:
            answer, _ = json.JSONDecoder().raw_decode(out)
        except json.JSONDecodeError:
            raise ValueError("the answer is not JSON") from None
        if not isinstance(answer, dict):
            raise ValueError("the answer is not a JSON object")
        values: dict[str, str] = {}
        for name, value in go_fields(answer):
            if name in ("serverurl", "username", "secret") and value is not None:
                if not isinstance(value, str):
                    raise ValueError(f"{name!r} is not a string")
                values[name] = value
        username, secret = values.get("username", ""), values.get("secret", "")
        source = f"{self.source} via {HELPER_PREFIX}{helper}"
        if username == _TOKEN_USERNAME:
            return Credential("", "", source, identity_token=secret)
        credential = Credential(username, secret, source)
        return None if credential.is_empty else credential

    def _warn(self, message: str) -> None:
        if message in self._warned:
            return
        if len(self._warned) < _WARNED_LIMIT:
            self._warned.add(message)
        log.warning("%s", message)


def _string(value: object, what: str, source: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{source}: {what} must be a string")
    return value


def _string_map(value: object, what: str, source: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {what} must be a JSON object of strings")
    return {str(key): _string(item, what, source) for key, item in value.items()}
