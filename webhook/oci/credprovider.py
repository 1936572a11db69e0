"""Kubelet credential provider plugins, run the way the kubelet runs them.

The kubelet takes ``--image-credential-provider-config`` (a ``CredentialProviderConfig`` file,
or a directory of them) and ``--image-credential-provider-bin-dir``; pinhook takes the same two
paths (``registry.imageCredentialProviderConfig`` / ``imageCredentialProviderBinDir``) and the
same binaries: ecr-credential-provider, auth-provider-gcp, acr-credential-provider. This module
follows kubernetes ``pkg/credentialprovider/plugin`` (v1.36):

* the config is decoded strictly (unknown or repeated fields, wrong types and unknown versions
  are errors) and validated with the kubelet's rules; a directory contributes its ``*.json``,
  ``*.yaml`` and ``*.yml`` files in name order, and a provider name may appear once;
* a provider runs for an image when one of its ``matchImages`` matches the image's normalised
  name (``docker.io/library/nginx``, no tag) by the kubelet's URL rules (:mod:`.urlmatch`);
* it gets ``{"kind":"CredentialProviderRequest","apiVersion":...,"image":...}`` on stdin, its
  ``args``, and pinhook's environment plus its ``env``; it is killed when its time is up;
* its answer is decoded strictly; a wrong ``apiVersion`` or ``kind``, an unknown field, a bad
  ``cacheKeyType`` or ``cacheDuration``, a non-zero exit: no credentials from it this time,
  logged, never cached;
* credentials are cached by ``cacheKeyType`` (the image, its registry ``host[:port]``, or one
  global entry) for ``cacheDuration``, else ``defaultCacheDuration`` (``0`` = not cached), and
  read back in the order image, registry, global; a cached answer costs no exec;
* concurrent lookups of one image share one exec (the kubelet's singleflight is per image);
* the ``auth`` keys of an answer are matched against the image like docker config keys, and
  all providers' answers form one keyring, in config order.

Providers with ``tokenAttributes`` need a service account token bound to the Pod being pulled;
pinhook does not mint those, so such providers are validated but never run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from ..errors import ConfigError
from ..singleflight import SingleFlight
from .command import CommandError, run_command
from .credential import Credential
from .keychain import DockerKeyring
from .reference import ImageRef
from .urlmatch import Location, parse_schemeless

log = logging.getLogger(__name__)

CONFIG_GROUP: Final = "kubelet.config.k8s.io"
CONFIG_VERSIONS: Final = ("v1alpha1", "v1beta1", "v1")
CONFIG_KIND: Final = "CredentialProviderConfig"
PROVIDER_API_VERSIONS: Final = tuple(
    f"credentialprovider.kubelet.k8s.io/{version}" for version in CONFIG_VERSIONS
)
REQUEST_KIND: Final = "CredentialProviderRequest"
RESPONSE_KIND: Final = "CredentialProviderResponse"
CACHE_KEY_TYPES: Final = ("Image", "Registry", "Global")
GLOBAL_CACHE_KEY: Final = "<global>"
_CONFIG_SUFFIXES: Final = (".json", ".yaml", ".yml")
_CACHE_LIMIT: Final = 4096
_TOKEN_CACHE_TYPES: Final = ("ServiceAccount", "Token")

ExecEvent = Callable[[str, str], None]  # (provider name, result: ok | error | timeout)


# -- the configuration ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    """One ``providers[]`` entry of a CredentialProviderConfig."""

    name: str
    match_images: tuple[str, ...]
    default_cache_seconds: float
    api_version: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    needs_service_account_token: bool = False


def load_provider_config(path: Path) -> list[ProviderSpec]:
    """Read and validate a CredentialProviderConfig file or directory, as the kubelet does.

    Raises ConfigError naming every problem.
    """
    files = _config_files(path)
    specs: list[ProviderSpec] = []
    seen: set[str] = set()
    problems: list[str] = []
    for file in files:
        providers = _decode_config(file)
        for raw in providers:
            name = raw.get("name", "")
            if name in seen:
                raise ConfigError(f"{path}: provider name {name!r} appears more than once")
            seen.add(name)
        problems.extend(f"{file}: {problem}" for problem in _validate(providers))
        specs.extend(_spec(raw) for raw in providers)
    if not specs:
        problems.append(f"{path}: providers: at least 1 item in plugins is required")
    if problems:
        raise ConfigError(f"{path}: invalid credential provider config", problems)
    return specs


def _config_files(path: Path) -> list[Path]:
    try:
        if not path.is_dir():
            path.stat()  # a missing path is reported here
            return [path]
        entries = sorted(os.scandir(path), key=lambda entry: entry.name)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    files = [
        Path(entry.path)
        for entry in entries
        if not entry.is_dir(follow_symlinks=False) and entry.name.endswith(_CONFIG_SUFFIXES)
    ]
    if not files:
        raise ConfigError(f"{path}: no configuration files (*.json, *.yaml, *.yml) found")
    return files


def _decode_config(file: Path) -> list[dict[str, Any]]:
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read it ({exc.strerror or exc})") from None
    document = _load_strict(data, str(file))
    if not isinstance(document, dict):
        raise ConfigError(f"{file}: not a CredentialProviderConfig (expected a mapping)")
    api_version, kind = document.get("apiVersion"), document.get("kind")
    group, _, version = str(api_version or "").rpartition("/")
    if not isinstance(kind, str) or not kind or not isinstance(api_version, str):
        raise ConfigError(f"{file}: apiVersion and kind are required")
    if group != CONFIG_GROUP or version not in CONFIG_VERSIONS or kind != CONFIG_KIND:
        raise ConfigError(
            f"{file}: expected kind {CONFIG_KIND} of {CONFIG_GROUP}/"
            f"{{{','.join(CONFIG_VERSIONS)}}}, got {kind} of {api_version}"
        )
    problems: list[str] = []
    _unknown(document, _TOP_FIELDS, "config", problems)
    providers = _strict_items(document, "providers", "config", problems)
    decoded = [
        _decode_provider(item, f"providers[{i}]", version, problems)
        for i, item in enumerate(providers)
    ]
    if problems:
        raise ConfigError(f"{file}: cannot decode it", problems)
    return decoded


_TOP_FIELDS = frozenset({"apiVersion", "kind", "providers"})
_PROVIDER_FIELDS = frozenset(
    {"name", "matchImages", "defaultCacheDuration", "apiVersion", "args", "env"}
)
_ENV_FIELDS = frozenset({"name", "value"})
_TOKEN_FIELDS = frozenset(
    {
        "serviceAccountTokenAudience",
        "cacheType",
        "requireServiceAccount",
        "requiredServiceAccountAnnotationKeys",
        "optionalServiceAccountAnnotationKeys",
    }
)


def _decode_provider(item: object, at: str, version: str, problems: list[str]) -> dict[str, Any]:
    """One provider as the kubelet's strict decoder reads it: exact field names, exact types,
    ``null`` as if absent."""
    fields = _PROVIDER_FIELDS | ({"tokenAttributes"} if version == "v1" else set())
    if item is None:
        return {}
    if not isinstance(item, dict):
        problems.append(f"{at}: expected a mapping")
        return {}
    _unknown(item, fields, at, problems)
    provider: dict[str, Any] = {
        "name": _strict_str(item, "name", at, problems),
        "matchImages": _strict_strings(item, "matchImages", at, problems),
        "apiVersion": _strict_str(item, "apiVersion", at, problems),
        "args": _strict_strings(item, "args", at, problems),
        "env": [],
    }
    duration = item.get("defaultCacheDuration")
    if duration is not None:
        provider["defaultCacheDuration"] = _strict_duration(
            duration, f"{at}.defaultCacheDuration", problems
        )
    for j, env in enumerate(_strict_items(item, "env", at, problems)):
        where = f"{at}.env[{j}]"
        if env is not None and not isinstance(env, dict):
            problems.append(f"{where}: expected a mapping")
            continue
        env = env or {}
        _unknown(env, _ENV_FIELDS, where, problems)
        name, value = (_strict_str(env, key, where, problems) for key in ("name", "value"))
        provider["env"].append((name, value))
    token = item.get("tokenAttributes")
    if token is not None:
        provider["tokenAttributes"] = _decode_token_attributes(
            token, f"{at}.tokenAttributes", problems
        )
    return provider


def _decode_token_attributes(token: object, at: str, problems: list[str]) -> dict[str, Any]:
    if not isinstance(token, dict):
        problems.append(f"{at}: expected a mapping")
        return {}
    _unknown(token, _TOKEN_FIELDS, at, problems)
    require = token.get("requireServiceAccount")
    if require is not None and not isinstance(require, bool):
        problems.append(f"{at}.requireServiceAccount: expected a boolean")
        require = None
    return {
        "serviceAccountTokenAudience": _strict_str(
            token, "serviceAccountTokenAudience", at, problems
        ),
        "cacheType": _strict_str(token, "cacheType", at, problems),
        "requireServiceAccount": require,
        "required": _strict_strings(token, "requiredServiceAccountAnnotationKeys", at, problems),
        "optional": _strict_strings(token, "optionalServiceAccountAnnotationKeys", at, problems),
    }


def _unknown(item: Mapping[str, Any], known: Iterable[str], at: str, problems: list[str]) -> None:
    for name in item:
        if name not in known:
            problems.append(f"{at}: unknown field {name!r}")


def _strict_str(item: Mapping[str, Any], name: str, at: str, problems: list[str]) -> str:
    value = item.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        problems.append(f"{at}.{name}: expected a string")
        return ""
    return value


def _strict_strings(item: Mapping[str, Any], name: str, at: str, problems: list[str]) -> list[str]:
    value = item.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        problems.append(f"{at}.{name}: expected a list of strings")
        return []
    strings: list[str] = []
    for i, element in enumerate(value):
        if element is not None and not isinstance(element, str):
            problems.append(f"{at}.{name}[{i}]: expected a string")
            continue
        strings.append(element or "")
    return strings


def _strict_items(item: Mapping[str, Any], name: str, at: str, problems: list[str]) -> list[Any]:
    value = item.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        problems.append(f"{at}.{name}: expected a list")
        return []
    return value


def _strict_duration(value: object, at: str, problems: list[str]) -> float | None:
    if not isinstance(value, str):
        problems.append(f"{at}: expected a duration string such as '12h'")
        return None
    try:
        return go_duration_seconds(value)
    except ValueError as exc:
        problems.append(f"{at}: {exc}")
        return None


def _validate(providers: Sequence[Mapping[str, Any]]) -> list[str]:
    """The kubelet's ``validateCredentialProviderConfig`` for one file's providers."""
    problems: list[str] = []
    for i, provider in enumerate(providers):
        at = f"providers[{i}]"
        name = provider.get("name", "")
        if "/" in name or " " in name or name in (".", ".."):
            problems.append(f"{at}.name: {name!r} is not a valid provider name")
        api_version = provider.get("apiVersion", "")
        if not api_version:
            problems.append(f"{at}.apiVersion: required")
        elif api_version not in PROVIDER_API_VERSIONS:
            problems.append(
                f"{at}.apiVersion: {api_version!r} is not one of {', '.join(PROVIDER_API_VERSIONS)}"
            )
        images = provider.get("matchImages", [])
        if not images:
            problems.append(f"{at}.matchImages: at least 1 item in matchImages is required")
        for image in images:
            if parse_schemeless(image) is None:
                problems.append(f"{at}.matchImages: {image!r} is not a valid match image")
        if "defaultCacheDuration" not in provider:
            problems.append(f"{at}.defaultCacheDuration: required")
        elif (provider["defaultCacheDuration"] or 0) < 0:
            problems.append(f"{at}.defaultCacheDuration: must be greater than or equal to 0")
        token = provider.get("tokenAttributes")
        if token is not None:
            problems.extend(_validate_token(token, api_version, f"{at}.tokenAttributes"))
    return problems


def _validate_token(token: Mapping[str, Any], api_version: str, at: str) -> list[str]:
    problems: list[str] = []
    if not token.get("serviceAccountTokenAudience"):
        problems.append(f"{at}.serviceAccountTokenAudience: required")
    require = token.get("requireServiceAccount")
    if require is None:
        problems.append(f"{at}.requireServiceAccount: required")
    if api_version != PROVIDER_API_VERSIONS[-1]:
        problems.append(f"{at}: only supported for {PROVIDER_API_VERSIONS[-1]}")
    required, optional = token.get("required", []), token.get("optional", [])
    if require is False and required:
        problems.append(
            f"{at}.requiredServiceAccountAnnotationKeys: needs requireServiceAccount: true"
        )
    for what, keys in (("required", required), ("optional", optional)):
        where = f"{at}.{what}ServiceAccountAnnotationKeys"
        if len(set(keys)) != len(keys):
            problems.append(f"{where}: duplicate keys")
        problems.extend(
            f"{where}: {key!r} is not a qualified name"
            for key in keys
            if not _is_qualified_name(key.lower())
        )
    if set(required) & set(optional):
        problems.append(f"{at}: annotation keys cannot be both required and optional")
    cache_type = token.get("cacheType", "")
    if cache_type not in _TOKEN_CACHE_TYPES:
        problems.append(f"{at}.cacheType: must be one of {', '.join(_TOKEN_CACHE_TYPES)}")
    return problems


_QUALIFIED_NAME: Final = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN: Final = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")


def _is_qualified_name(key: str) -> bool:
    """apimachinery's ``IsQualifiedName``: ``[dns-subdomain/]name``."""
    prefix, slash, name = key.rpartition("/") if key.count("/") == 1 else ("", "", key)
    if "/" in name or not 0 < len(name) <= 63:
        return False
    if not _QUALIFIED_NAME.fullmatch(name):
        return False
    return not slash or (0 < len(prefix) <= 253 and _DNS_SUBDOMAIN.fullmatch(prefix) is not None)


def _spec(provider: Mapping[str, Any]) -> ProviderSpec:
    return ProviderSpec(
        name=provider.get("name", ""),
        match_images=tuple(provider.get("matchImages", ())),
        default_cache_seconds=provider.get("defaultCacheDuration") or 0.0,
        api_version=provider.get("apiVersion", ""),
        args=tuple(provider.get("args", ())),
        env=tuple(provider.get("env", ())),
        needs_service_account_token=bool(
            provider.get("tokenAttributes", {}).get("serviceAccountTokenAudience")
        ),
    )


# -- strict documents -------------------------------------------------------------------------


def _load_strict(data: bytes, source: str) -> Any:
    """JSON when it starts with ``{`` (as apimachinery decides), else YAML; a repeated key is
    an error either way."""
    text = data.decode("utf-8", "replace")
    try:
        if text.lstrip(" \t\r\n").startswith("{"):
            return json.loads(text, object_pairs_hook=_unique_json_object)
        # The first document only, as sigs.k8s.io/yaml reads it.
        return next(yaml.load_all(text, Loader=_StrictLoader), None)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{source}: cannot parse it", [str(exc)]) from None


def _unique_json_object(members: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for name, value in members:
        if name in document:
            raise ValueError(f"duplicate field {name!r}")
        document[name] = value
    return document


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that refuses a mapping with a repeated key."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # merged keys may be overridden, as in go-yaml
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str | int | float | bool | None):
                continue  # the base class reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# -- durations ----------------------------------------------------------------------------------

_UNITS: Final = {
    b"ns": 1,
    b"us": 1_000,
    "µs".encode(): 1_000,
    "μs".encode(): 1_000,
    b"ms": 1_000_000,
    b"s": 1_000_000_000,
    b"m": 60_000_000_000,
    b"h": 3_600_000_000_000,
}
_MAX_NS: Final = 1 << 63


def go_duration_seconds(text: str) -> float:
    """Go's ``time.ParseDuration`` (``1h30m``, ``0.5s``, ``0``), in seconds; ValueError when
    Go refuses it."""
    rest = text.encode("utf-8", "surrogateescape")
    negative = rest[:1] == b"-"
    if rest[:1] in (b"-", b"+"):
        rest = rest[1:]
    if rest == b"0":
        return 0.0
    if not rest:
        raise ValueError(f"invalid duration {text!r}")
    total = 0
    while rest:
        value, rest = _duration_part(rest, text)
        total += value
        if total > _MAX_NS:
            raise ValueError(f"invalid duration {text!r}")
    if not negative and total > _MAX_NS - 1:
        raise ValueError(f"invalid duration {text!r}")
    return (-total if negative else total) / 1e9


def _duration_part(rest: bytes, text: str) -> tuple[int, bytes]:
    if not (rest[:1] == b"." or rest[:1].isdigit()):
        raise ValueError(f"invalid duration {text!r}")
    digits = len(rest) - len(rest.lstrip(b"0123456789"))
    whole = int(rest[:digits] or b"0")
    if whole > _MAX_NS:
        raise ValueError(f"invalid duration {text!r}")
    rest = rest[digits:]
    fraction, scale, post = 0, 1.0, False
    if rest[:1] == b".":
        rest = rest[1:]
        count = len(rest) - len(rest.lstrip(b"0123456789"))
        fraction, scale = _leading_fraction(rest[:count])
        rest, post = rest[count:], count > 0
    if not digits and not post:
        raise ValueError(f"invalid duration {text!r}")
    unit_length = next(
        (i for i, byte in enumerate(rest) if byte == 0x2E or 0x30 <= byte <= 0x39), len(rest)
    )
    if unit_length == 0:
        raise ValueError(f"missing unit in duration {text!r}")
    unit = _UNITS.get(rest[:unit_length])
    if unit is None:
        shown = rest[:unit_length].decode(errors="replace")
        raise ValueError(f"unknown unit {shown!r} in duration {text!r}")
    if whole > _MAX_NS // unit:
        raise ValueError(f"invalid duration {text!r}")
    value = whole * unit
    if fraction:
        value += int(float(fraction) * (float(unit) / scale))
        if value > _MAX_NS:
            raise ValueError(f"invalid duration {text!r}")
    return value, rest[unit_length:]


def _leading_fraction(digits: bytes) -> tuple[int, float]:
    value, scale = 0, 1.0
    for byte in digits:
        following = value * 10 + byte - 0x30
        if value > (_MAX_NS - 1) // 10 or following > _MAX_NS:
            break  # Go stops adding digits once they would overflow
        value, scale = following, scale * 10
    return value, scale


# -- responses ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProviderResponse:
    cache_key_type: str
    cache_seconds: float | None  # None: absent, use the provider's default
    auth: tuple[tuple[str, str, str], ...]  # (key, username, password)


_RESPONSE_FIELDS = frozenset({"apiVersion", "kind", "cacheKeyType", "cacheDuration", "auth"})
_AUTH_FIELDS = frozenset({"username", "password"})


def parse_response(stdout: bytes, api_version: str) -> ProviderResponse:
    """A CredentialProviderResponse decoded as strictly as the kubelet decodes it.

    Raises ValueError saying what is wrong, never quoting a credential.
    """
    try:
        document = json.loads(
            stdout.decode("utf-8", "replace"),
            object_pairs_hook=_unique_json_object,
            parse_constant=_reject_constant,
        )
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"the answer is not one JSON object ({_safe(exc)})") from None
    if not isinstance(document, dict):
        raise ValueError("the answer is not a JSON object")
    unknown = sorted(set(document) - _RESPONSE_FIELDS)
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r}")
    if document.get("apiVersion") != api_version:
        raise ValueError(f"apiVersion {document.get('apiVersion')!r} is not {api_version!r}")
    if document.get("kind") != RESPONSE_KIND:
        raise ValueError(f"kind {document.get('kind')!r} is not {RESPONSE_KIND!r}")
    key_type = document.get("cacheKeyType")
    if key_type not in CACHE_KEY_TYPES:
        raise ValueError(f"cacheKeyType {key_type!r} is not one of {', '.join(CACHE_KEY_TYPES)}")
    duration = document.get("cacheDuration")
    if duration is not None and not isinstance(duration, str):
        raise ValueError("cacheDuration is not a duration string")
    seconds = None if duration is None else go_duration_seconds(duration)
    return ProviderResponse(key_type, seconds, _auth_entries(document.get("auth")))


def _auth_entries(auth: object) -> tuple[tuple[str, str, str], ...]:
    if auth is None:
        return ()
    if not isinstance(auth, dict):
        raise ValueError("auth is not a JSON object")
    entries = []
    for key, config in auth.items():
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise ValueError(f"auth[{key!r}] is not a JSON object")
        unknown = sorted(set(config) - _AUTH_FIELDS)
        if unknown:
            raise ValueError(f"auth[{key!r}]: unknown field {unknown[0]!r}")
        username, password = config.get("username") or "", config.get("password") or ""
        if not isinstance(username, str) or not isinstance(password, str):
            raise ValueError(f"auth[{key!r}]: username and password must be strings")
        entries.append((key, username, password))
    return tuple(entries)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _safe(exc: Exception) -> str:
    # json's messages name a position and a reason, ours a field name: never the text itself.
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return str(exc) if isinstance(exc, ValueError) else type(exc).__name__


# -- running providers --------------------------------------------------------------------------


@dataclass(slots=True)
class _Cached:
    keyring: DockerKeyring
    expires: float


class _Provider:
    """One configured provider: its matchers, its program, its cache and its exec flights."""

    def __init__(
        self,
        spec: ProviderSpec,
        program: Path,
        *,
        timeout: float,
        clock: Callable[[], float],
        on_exec: ExecEvent,
    ) -> None:
        self.spec = spec
        self._program = program
        self._timeout = timeout
        self._clock = clock
        self._on_exec = on_exec
        self._matchers = tuple(
            where for where in map(Location.parse, spec.match_images) if where is not None
        )
        self._cache: OrderedDict[str, _Cached] = OrderedDict()
        self._flights: SingleFlight[str, DockerKeyring] = SingleFlight()

    def allows(self, image: Location) -> bool:
        return any(image.matched_by(glob) for glob in self._matchers)

    async def provide(self, image: str, deadline: float) -> DockerKeyring:
        cached = self._cached(image)
        if cached is not None:
            return cached
        return await self._flights.run(
            image,
            lambda: self._exec(image),
            deadline,
            f"credential provider {self.spec.name} for {image}",
        )

    def _cached(self, image: str) -> DockerKeyring | None:
        now = self._clock()
        for key in (image, _registry_of(image), GLOBAL_CACHE_KEY):
            entry = self._cache.get(key)
            if entry is None:
                continue
            if entry.expires < now:
                del self._cache[key]
                continue
            self._cache.move_to_end(key)
            return entry.keyring
        return None

    async def _exec(self, image: str) -> DockerKeyring:
        spec = self.spec
        request = json.dumps(
            {"kind": REQUEST_KIND, "apiVersion": spec.api_version, "image": image},
            separators=(",", ":"),
            ensure_ascii=False,
        )
        # The kubelet's environment plus the provider's env; the later value of a name wins.
        env = {**os.environ, **dict(spec.env)}
        try:
            result = await run_command(
                [str(self._program), *spec.args],
                (request + "\n").encode(),
                time_limit=self._timeout,
                env=env,
            )
        except CommandError as exc:
            return self._failed(image, str(exc), "timeout" if exc.timed_out else "error")
        if result.returncode != 0:
            stderr = result.stderr.decode("utf-8", "replace").strip()[:300]
            return self._failed(image, f"exited with {result.returncode}: {stderr!r}", "error")
        try:
            response = parse_response(result.stdout, spec.api_version)
        except ValueError as exc:
            return self._failed(image, f"answered an unusable response: {exc}", "error")
        self._on_exec(spec.name, "ok")
        source = f"credential provider {spec.name}"
        keyring = DockerKeyring(
            (key, Credential(user, password, source)) for key, user, password in response.auth
        )
        self._store(image, response, keyring)
        return keyring

    def _failed(self, image: str, problem: str, result: str) -> DockerKeyring:
        log.warning("credential provider %s for %s: %s", self.spec.name, image, problem)
        self._on_exec(self.spec.name, result)
        return DockerKeyring()

    def _store(self, image: str, response: ProviderResponse, keyring: DockerKeyring) -> None:
        seconds = response.cache_seconds
        if seconds is None:
            seconds = self.spec.default_cache_seconds
        if seconds <= 0:
            return  # 0 means "do not cache"; a negative duration is expired at once
        key = {
            "Image": image,
            "Registry": _registry_of(image),
            "Global": GLOBAL_CACHE_KEY,
        }[response.cache_key_type]
        self._cache[key] = _Cached(keyring, self._clock() + seconds)
        self._cache.move_to_end(key)
        while len(self._cache) > _CACHE_LIMIT:
            self._cache.popitem(last=False)


def _registry_of(image: str) -> str:
    """The kubelet's ``parseRegistry``: everything before the first ``/``."""
    return image.partition("/")[0]


class CredentialProviders:
    """Every configured provider, asked together for an image's credentials."""

    def __init__(
        self,
        specs: Sequence[ProviderSpec],
        bin_dir: Path,
        *,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        on_exec: ExecEvent | None = None,
    ) -> None:
        """Raises ConfigError when the bin dir or a provider's program is missing."""
        _check_bin_dir(bin_dir)
        providers: list[_Provider] = []
        for spec in specs:
            program = _program(bin_dir, spec.name)
            for image in spec.match_images:
                if "://" in image:
                    # Valid for the kubelet too, and never matches there either.
                    log.warning(
                        "credential provider %s: matchImages entry %r has a scheme and matches"
                        " no image; write the host only",
                        spec.name,
                        image,
                    )
            if spec.needs_service_account_token:
                log.warning(
                    "credential provider %s needs a service account token (tokenAttributes);"
                    " pinhook does not request them, so it is not run",
                    spec.name,
                )
                continue
            providers.append(
                _Provider(
                    spec,
                    program,
                    timeout=timeout,
                    clock=clock,
                    on_exec=on_exec or (lambda _name, _result: None),
                )
            )
        self._providers = tuple(providers)

    @classmethod
    def from_config(
        cls,
        config: Path,
        bin_dir: Path,
        *,
        timeout: float = 10.0,
        on_exec: ExecEvent | None = None,
    ) -> CredentialProviders:
        return cls(load_provider_config(config), bin_dir, timeout=timeout, on_exec=on_exec)

    @property
    def names(self) -> list[str]:
        return [provider.spec.name for provider in self._providers]

    async def lookup(self, ref: ImageRef, deadline: float) -> list[Credential]:
        """The credentials the providers give for ``ref``, in the order the kubelet tries them.

        Raises DeadlineExceeded when a provider that must be asked has not answered by
        ``deadline`` (its exec goes on, and its answer is cached for the next request).
        """
        image = ref.name
        target = Location.parse(image)
        if target is None:
            return []
        matching = [provider for provider in self._providers if provider.allows(target)]
        if not matching:
            return []
        answers = await asyncio.gather(
            *(provider.provide(image, deadline) for provider in matching), return_exceptions=True
        )
        keyrings: list[DockerKeyring] = []
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer  # DeadlineExceeded: the others were awaited, nothing is left behind
            keyrings.append(answer)
        return DockerKeyring.merge(keyrings).lookup_name(image)


def _check_bin_dir(bin_dir: Path) -> None:
    if not bin_dir.is_dir():
        raise ConfigError(f"credential provider bin dir {bin_dir} does not exist")


def _program(bin_dir: Path, name: str) -> Path:
    """The kubelet's ``exec.LookPath(filepath.Join(binDir, name))``."""
    program = bin_dir / name
    try:
        mode = program.stat().st_mode
    except OSError:
        raise ConfigError(f"credential provider program {program} does not exist") from None
    if stat.S_ISDIR(mode) or not mode & 0o111:
        raise ConfigError(f"credential provider program {program} is not executable")
    return program
