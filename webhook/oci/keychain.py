"""Registry credentials from docker config documents, matched to images as the kubelet does.

The rules follow kubernetes/kubernetes ``pkg/credentialprovider`` (``keyring.go``,
``config.go``) and ``pkg/credentialprovider/secrets``:

* a key gets ``https://`` when it has no ``http(s)://`` scheme, the scheme is then dropped, a
  leading ``/v1/`` or ``/v2/`` is cut from the path, and the key is ``host[:port]`` plus its
  path when that is neither empty nor ``/`` (``https://index.docker.io/v1/`` ->
  ``index.docker.io``);
* keys are tried in reverse-sorted order and every match is returned; a key matches an image
  name when the ports are equal, the hosts have the same number of dot-labels, each label
  matches as a Go ``filepath.Match`` glob, and the key's path is a plain string prefix of the
  image's path;
* when nothing matched and the image lives on Docker Hub, the ``index.docker.io``
  credentials are returned;
* an entry's ``auth`` (base64 ``user:pass``) wins over ``username``/``password``.

Where pinhook is deliberately more lenient than the kubelet (which rejects a whole secret
over one bad entry), an unusable entry is skipped with a warning instead.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from ..errors import ConfigError
from ..redact import scrub
from .credential import Credential
from .reference import DOCKER_HUB, DOCKER_HUB_LEGACY, ImageRef, split_host_port

log = logging.getLogger(__name__)

_DOCKER_HUB_HOSTS = frozenset({DOCKER_HUB, DOCKER_HUB_LEGACY})


def normalise_key(raw: str) -> str | None:
    """The kubelet's index key for a docker config key, or None when it cannot be parsed."""
    value = raw if raw.startswith(("https://", "http://")) else "https://" + raw
    parts = _split_url(value.partition("://")[2])
    if parts is None or not parts[0]:
        return None
    host, path = parts
    if path.startswith(("/v1/", "/v2/")):
        path = path[3:]
    return host + path if path not in ("", "/") else host


# What Go's net/url accepts in a host besides letters, digits and non-ASCII.
_HOST_PUNCTUATION = frozenset("-._~!$&'()*+,;=:[]<>\"%")


def _split_url(schemeless: str) -> tuple[str, str] | None:
    """(host[:port], unescaped path) as Go's ``url.Parse`` splits ``https://`` + the text.

    Python's ``urlsplit`` is not used: it rejects glob classes such as ``reg[0-9].io`` in a
    host, which Go accepts.
    """
    rest = schemeless.partition("#")[0].partition("?")[0]
    authority, slash, path = rest.partition("/")
    host = authority.rpartition("@")[2]
    if not all(ch.isalnum() or ch in _HOST_PUNCTUATION or ord(ch) >= 0x80 for ch in host):
        return None
    if not _valid_port(host):
        return None
    try:
        return host, unquote(slash + path, errors="strict")
    except UnicodeDecodeError:
        return None


def _valid_port(host: str) -> bool:
    """Go's ``validOptionalPort`` on what follows the host (``[v6]:port`` or ``name:port``)."""
    if host.startswith("["):
        end = host.find("]")
        if end == -1:
            return False
        tail = host[end + 1 :]
        return tail in ("", ":") or (tail[:1] == ":" and tail[1:].isascii() and tail[1:].isdigit())
    _, colon, port = host.rpartition(":")
    return not colon or port == "" or (port.isascii() and port.isdigit())


@dataclass(frozen=True, slots=True)
class _Location:
    """A schemeless URL split the way the kubelet's ``URLsMatch`` compares it."""

    labels: tuple[str, ...]
    port: int | None
    path: str

    @classmethod
    def parse(cls, schemeless: str) -> _Location | None:
        parts = _split_url(schemeless)
        if parts is None:
            return None
        host, port = split_host_port(parts[0])
        return cls(tuple(host.split(".")), port, parts[1])


class _Glob:
    """One host label pattern with Go ``path/filepath.Match`` semantics.

    A malformed pattern never matches (the kubelet ignores ``ErrBadPattern`` and moves on).
    """

    __slots__ = ("_regex",)

    def __init__(self, pattern: str) -> None:
        self._regex = _glob_regex(pattern)

    def matches(self, text: str) -> bool:
        return self._regex is not None and self._regex.fullmatch(text) is not None


def _glob_regex(pattern: str) -> re.Pattern[str] | None:
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "*":
            out.append("[^/]*")
            i += 1
        elif ch == "?":
            out.append("[^/]")
            i += 1
        elif ch == "\\":
            if i + 1 >= len(pattern):
                return None
            out.append(re.escape(pattern[i + 1]))
            i += 2
        elif ch == "[":
            parsed = _glob_class(pattern, i + 1)
            if parsed is None:
                return None
            regex, i = parsed
            out.append(regex)
        else:
            out.append(re.escape(ch))
            i += 1
    return re.compile("".join(out), re.DOTALL)


def _glob_class(pattern: str, i: int) -> tuple[str, int] | None:
    """Parse ``[^a-z\\]]``-style classes starting after ``[``; None when malformed."""
    negate = i < len(pattern) and pattern[i] == "^"
    i += negate
    ranges: list[tuple[str, str]] = []
    while True:
        if i < len(pattern) and pattern[i] == "]" and ranges:
            i += 1
            break
        low = _glob_class_char(pattern, i)
        if low is None:
            return None
        lo, i = low
        hi = lo
        if i < len(pattern) and pattern[i] == "-":
            high = _glob_class_char(pattern, i + 1)
            if high is None:
                return None
            hi, i = high
        ranges.append((lo, hi))
    body = "".join(f"{re.escape(lo)}-{re.escape(hi)}" for lo, hi in ranges if lo <= hi)
    if not body:
        return ("." if negate else "(?!)"), i
    return f"[{'^' if negate else ''}{body}]", i


def _glob_class_char(pattern: str, i: int) -> tuple[str, int] | None:
    if i >= len(pattern) or pattern[i] in "-]":
        return None
    if pattern[i] == "\\":
        i += 1
        if i >= len(pattern):
            return None
    return pattern[i], i + 1


@dataclass(frozen=True, slots=True)
class _Key:
    """An index key with its parsed host globs, ready to be matched."""

    text: str
    globs: tuple[_Glob, ...]
    port: int | None
    path: str

    @classmethod
    def parse(cls, key: str) -> _Key | None:
        location = _Location.parse(key)
        if location is None:
            return None
        globs = tuple(_Glob(label) for label in location.labels)
        return cls(key, globs, location.port, location.path)

    def matches(self, target: _Location) -> bool:
        if self.port != target.port or len(self.globs) != len(target.labels):
            return False
        if not target.path.startswith(self.path):
            return False
        return all(
            glob.matches(label) for glob, label in zip(self.globs, target.labels, strict=True)
        )


def is_default_registry_match(name: str) -> bool:
    """Whether an image name pulls from Docker Hub (kubelet's ``isDefaultRegistryMatch``)."""
    first, slash, _ = name.partition("/")
    if not first:
        return False
    if not slash or first in _DOCKER_HUB_HOSTS:
        return True
    return not any(ch in first for ch in ".:")


class DockerKeyring:
    """Credentials parsed from .dockerconfigjson / .dockercfg / ~/.docker/config.json, matched
    as the kubelet does.

    Immutable once built; :meth:`merge` combines keyrings the way the kubelet folds a pod's
    pull secrets into one keyring (all keys in one reverse-sorted index, credentials under the
    same key kept in the order their keyrings were given).
    """

    __slots__ = ("_creds", "_index")

    def __init__(self, entries: Iterable[tuple[str, Credential]] = ()) -> None:
        """Build from ``(config key, credential)`` pairs; keys are normalised here."""
        creds: dict[str, list[Credential]] = {}
        for raw, credential in entries:
            key = normalise_key(raw)
            if key is None:
                log.warning(
                    "skipping registry key %r from %s: not a URL", scrub(raw), credential.source
                )
                continue
            creds.setdefault(key, []).append(credential)
        self._creds: dict[str, tuple[Credential, ...]] = {k: tuple(v) for k, v in creds.items()}
        index = (_Key.parse(key) for key in sorted(self._creds, reverse=True))
        self._index: tuple[_Key, ...] = tuple(key for key in index if key is not None)

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_dockerconfigjson(cls, data: bytes, *, source: str) -> DockerKeyring:
        """Parse the ``{"auths": {...}}`` form (``.dockerconfigjson``, ``config.json``)."""
        return cls._from_auths_document(_load_json(data, source), source)

    @classmethod
    def from_dockercfg(cls, data: bytes, *, source: str) -> DockerKeyring:
        """Parse the legacy ``.dockercfg`` form: the map of registry keys itself."""
        document = _load_json(data, source)
        if not isinstance(document, dict):
            raise ConfigError(f"{source}: a .dockercfg document must be a JSON object")
        return cls(_credentials(document, source))

    @classmethod
    def from_file(cls, path: Path) -> DockerKeyring:
        """Read a docker config file, telling the ``auths`` form from the legacy one."""
        source = f"docker config {path}"
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read it ({exc.strerror or exc})") from exc
        document = _load_json(data, source)
        if not isinstance(document, dict):
            raise ConfigError(f"{source}: a docker config must be a JSON object")
        if "auths" in document or not all(isinstance(v, dict) for v in document.values()):
            return cls._from_auths_document(document, source)
        return cls(_credentials(document, source))

    @classmethod
    def merge(cls, keyrings: Iterable[DockerKeyring]) -> DockerKeyring:
        """One keyring holding every key of ``keyrings``, as the kubelet builds it."""
        merged = cls()
        creds: dict[str, list[Credential]] = {}
        for keyring in keyrings:
            for key, credentials in keyring._creds.items():
                creds.setdefault(key, []).extend(credentials)
        merged._creds = {key: tuple(values) for key, values in creds.items()}
        parsed = (_Key.parse(key) for key in sorted(creds, reverse=True))
        merged._index = tuple(key for key in parsed if key is not None)
        return merged

    @classmethod
    def _from_auths_document(cls, document: object, source: str) -> DockerKeyring:
        if not isinstance(document, dict):
            raise ConfigError(f"{source}: a docker config must be a JSON object")
        auths = document.get("auths")
        if auths is None:
            log.warning('%s has no "auths"; it gives no credentials', source)
            return cls()
        if not isinstance(auths, dict):
            raise ConfigError(f'{source}: "auths" must be a JSON object')
        return cls(_credentials(auths, source))

    # -- lookup ------------------------------------------------------------------------

    def lookup(self, image: ImageRef) -> list[Credential]:
        """Every credential that applies to ``image``, in the order the kubelet tries them."""
        return self.lookup_name(image.name)

    def lookup_name(self, name: str) -> list[Credential]:
        """Like :meth:`lookup` for a normalised repository name (``docker.io/library/nginx``)."""
        target = _Location.parse(name)
        found: list[Credential] = []
        if target is not None:
            for key in self._index:
                if key.matches(target):
                    found.extend(self._creds[key.text])
        if not found and is_default_registry_match(name):
            # ``https://index.docker.io/v1/`` normalises to this key (the kubelet's
            # ``defaultRegistryHost``): Docker Hub's credentials of last resort.
            found.extend(self._creds.get(DOCKER_HUB_LEGACY, ()))
        return found

    # -- introspection -----------------------------------------------------------------

    def keys(self) -> list[str]:
        """The normalised keys in the order they are tried."""
        return [key.text for key in self._index]

    def __len__(self) -> int:
        return sum(len(values) for values in self._creds.values())

    def __bool__(self) -> bool:
        return bool(self._creds)

    def __repr__(self) -> str:
        return f"DockerKeyring(keys={self.keys()!r})"


def _load_json(data: bytes, source: str) -> Any:
    try:
        return json.loads(data)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        # The message names a position, never the document's text: it may hold secrets.
        raise ConfigError(
            f"{source}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from exc


def _credentials(entries: Mapping[str, object], source: str) -> Iterator[tuple[str, Credential]]:
    for key, entry in entries.items():
        credential = _credential(key, entry, source)
        if credential is not None:
            yield key, credential


def _credential(key: str, entry: object, source: str) -> Credential | None:
    if not isinstance(entry, dict):
        log.warning("skipping registry %r in %s: the entry is not a JSON object", key, source)
        return None
    # Go's encoding/json matches field names case-insensitively ("Username" works too).
    fields = {str(name).lower(): value for name, value in entry.items()}
    auth = fields.get("auth")
    if auth not in (None, ""):
        return _credential_from_auth(key, auth, source)
    username, password = fields.get("username", ""), fields.get("password", "")
    if not isinstance(username, str) or not isinstance(password, str):
        log.warning("skipping registry %r in %s: username/password not strings", key, source)
        return None
    if not username and not password:
        # docker login with a credential store writes such placeholder entries.
        log.debug("skipping registry %r in %s: the entry holds no credential", key, source)
        return None
    return Credential(username, password, source)


def _credential_from_auth(key: str, auth: object, source: str) -> Credential | None:
    if not isinstance(auth, str):
        log.warning('skipping registry %r in %s: "auth" is not a string', key, source)
        return None
    try:
        decoded = base64.b64decode(auth, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        log.warning('skipping registry %r in %s: "auth" is not base64 text', key, source)
        return None
    username, colon, password = decoded.partition(":")
    if not colon:
        log.warning('skipping registry %r in %s: "auth" is not user:password', key, source)
        return None
    return Credential(username, password, source)
