"""Registry credentials from docker config documents, read and matched as the kubelet does.

The rules follow kubernetes/kubernetes ``pkg/credentialprovider`` (``config.go``,
``keyring.go``) and ``pkg/credentialprovider/secrets`` as of v1.36:

* a document is read by Go's ``encoding/json``: field names match case-insensitively
  (``Auths``, ``AUTH``), unknown fields are ignored, ``null`` leaves a field as it was, and a
  value of the wrong type makes the whole document unusable;
* an entry's ``auth`` is base64 of ``user:password`` and, when not empty, wins over
  ``username``/``password``; :func:`decode_auth` accepts exactly what the kubelet accepts;
* one undecodable ``auth`` or mistyped field makes the kubelet refuse the whole pull secret
  (and so every pull of a pod that names it): here the whole document raises
  :class:`~webhook.errors.ConfigError`, whose message names the registry key and the problem,
  never a secret;
* a key Go cannot parse as a URL is logged and ignored, as the kubelet does;
* keys are normalised and matched by :mod:`.urlmatch`; keys are tried in reverse-sorted order
  and every match is returned; when nothing matched and the image lives on Docker Hub, the
  ``index.docker.io`` credentials are returned;
* an entry with neither username nor password still matches (and so still suppresses the
  Docker Hub fallback); it is not returned, since containerd pulls anonymously with it.

The kubelet reads only ``username``, ``password``, ``email`` and ``auth``; with ``tokens=True``
(pinhook's own docker config file, read as docker does) ``identitytoken`` and
``registrytoken`` are kept as well.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..errors import ConfigError
from ..redact import scrub
from .credential import Credential
from .reference import DOCKER_HUB, DOCKER_HUB_LEGACY, ImageRef
from .urlmatch import Location, normalise_key

log = logging.getLogger(__name__)

_DOCKER_HUB_HOSTS = frozenset({DOCKER_HUB, DOCKER_HUB_LEGACY})
_BASE64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
_KUBELET_FIELDS = ("username", "password", "email", "auth")
# docker/cli's AuthConfig adds these; the kubelet's struct ignores them.
_TOKEN_FIELDS = ("identitytoken", "registrytoken", "serveraddress")


def decode_auth(field: str) -> tuple[str, str]:
    """An ``auth`` value decoded as the kubelet's ``decodeDockerConfigFieldAuth`` does.

    Standard base64, padded or not (the kubelet picks by a trailing ``=``); ``\\r`` and
    ``\\n`` are skipped anywhere; any other character outside the alphabet, wrong padding, or a
    length no base64 text can have is refused; the text is split at its first ``:``. Raises
    ValueError, whose message never holds the value.
    """
    compact = field.replace("\r", "").replace("\n", "")
    body = compact.rstrip("=")
    if not _BASE64_ALPHABET.issuperset(body):
        raise ValueError('"auth" is not base64')
    padding = len(compact) - len(body)
    # The kubelet picks padded decoding when the trimmed text ends with "="; past the
    # alphabet check only \r and \n can follow it, so that is when ``compact`` does.
    if padding:
        well_formed = padding in (1, 2) and len(compact) % 4 == 0
    else:
        well_formed = padding == 0 and len(compact) % 4 != 1
    if not well_formed:
        raise ValueError('"auth" is not base64 (bad length or padding)')
    decoded = _base64_bits(body).decode("utf-8", "replace")
    username, colon, password = decoded.partition(":")
    if not colon:
        raise ValueError('"auth" is not base64 of "username:password"')
    return username, password


def _base64_bits(body: str) -> bytes:
    """Decode base64 without padding, keeping Go's tolerance of non-zero trailing bits."""
    value = 0
    for char in body:
        value = value << 6 | _BASE64_INDEX[char]
    extra = len(body) * 6 % 8
    return (value >> extra).to_bytes(len(body) * 6 // 8, "big")


_BASE64_INDEX = {
    char: index
    for index, char in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
}


def is_default_registry_match(name: str) -> bool:
    """Whether an image name pulls from Docker Hub (kubelet's ``isDefaultRegistryMatch``)."""
    first, slash, _ = name.partition("/")
    if not first:
        return False
    if not slash or first in _DOCKER_HUB_HOSTS:
        return True
    return not any(ch in first for ch in ".:")


class DockerKeyring:
    """Credentials by docker config key, matched to images as the kubelet does.

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
                    "ignoring registry key %r in %s: not a URL", scrub(raw), credential.source
                )
                continue
            creds.setdefault(key, []).append(credential)
        self._creds: dict[str, tuple[Credential, ...]] = {}
        self._index: tuple[tuple[str, Location], ...] = ()
        self._set(creds)

    def _set(self, creds: Mapping[str, Iterable[Credential]]) -> None:
        self._creds = {key: tuple(values) for key, values in creds.items()}
        parsed = ((key, Location.parse(key)) for key in sorted(self._creds, reverse=True))
        self._index = tuple((key, where) for key, where in parsed if where is not None)

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_dockerconfigjson(cls, data: bytes, *, source: str) -> DockerKeyring:
        """Parse the ``{"auths": {...}}`` form (``.dockerconfigjson``), as the kubelet does."""
        return cls(auths_entries(load_json(data, source), source))

    @classmethod
    def from_dockercfg(cls, data: bytes, *, source: str) -> DockerKeyring:
        """Parse the legacy ``.dockercfg`` form, the map of registry keys itself."""
        document = load_json(data, source)
        if document is None:
            return cls()
        if not isinstance(document, dict):
            raise ConfigError(f"{source}: a .dockercfg document must be a JSON object")
        return cls(credential_entries(document, source))

    @classmethod
    def merge(cls, keyrings: Iterable[DockerKeyring]) -> DockerKeyring:
        """One keyring holding every key of ``keyrings``, as the kubelet builds it."""
        creds: dict[str, list[Credential]] = {}
        for keyring in keyrings:
            for key, credentials in keyring._creds.items():
                creds.setdefault(key, []).extend(credentials)
        merged = cls()
        merged._set(creds)
        return merged

    # -- lookup ------------------------------------------------------------------------

    def lookup(self, image: ImageRef) -> list[Credential]:
        """Every credential that applies to ``image``, in the order the kubelet tries them."""
        return self.lookup_name(image.name)

    def lookup_name(self, name: str) -> list[Credential]:
        """Like :meth:`lookup` for a normalised repository name (``docker.io/library/nginx``)."""
        if not self._creds:  # no docker config: nothing to match, on every cache miss
            return []
        target = Location.parse(name)
        found: list[Credential] = []
        if target is not None:
            for key, where in self._index:
                if target.matched_by(where):
                    found.extend(self._creds[key])
        if not found and is_default_registry_match(name):
            # ``https://index.docker.io/v1/`` normalises to this key (the kubelet's
            # ``defaultRegistryHost``): Docker Hub's credentials of last resort.
            found.extend(self._creds.get(DOCKER_HUB_LEGACY, ()))
        return [credential for credential in found if not credential.is_empty]

    # -- introspection -----------------------------------------------------------------

    def keys(self) -> list[str]:
        """The normalised keys in the order they are tried."""
        return [key for key, _ in self._index]

    def __len__(self) -> int:
        return sum(len(values) for values in self._creds.values())

    def __bool__(self) -> bool:
        return bool(self._creds)

    def __repr__(self) -> str:
        return f"DockerKeyring(keys={self.keys()!r})"


# -- documents, as Go's encoding/json reads them ---------------------------------------------


class _Object(dict[str, Any]):
    """A JSON object that also keeps every member in order, duplicates included (Go sees
    them all: a repeated field is assigned twice)."""

    __slots__ = ("members",)

    def __init__(self, members: list[tuple[str, Any]]) -> None:
        super().__init__(members)
        self.members = members


def load_json(data: bytes, source: str) -> Any:
    """Parse JSON as Go would for a docker config: bytes that are not UTF-8 become U+FFFD,
    ``NaN``/``Infinity`` are errors. Raises ConfigError naming a position, never the text."""
    text = data.decode("utf-8", "replace")
    try:
        return _go_string(json.loads(text, object_pairs_hook=_Object, parse_constant=_constant))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{source}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except (ValueError, RecursionError):
        raise ConfigError(f"{source}: not valid JSON") from None


def _constant(name: str) -> float:
    raise ValueError(name)


def _go_string(value: Any) -> Any:
    """Lone UTF-16 surrogates from ``\\ud800``-style escapes read as U+FFFD, as in Go."""
    if isinstance(value, str) and any("\ud800" <= ch <= "\udfff" for ch in value):
        return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in value)
    return value


def go_fields(document: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """The members of a JSON object with names folded as Go matches struct fields."""
    members = document.members if isinstance(document, _Object) else document.items()
    for name, value in members:
        yield _go_fold(str(_go_string(name))), value


def _go_fold(name: str) -> str:
    # Go's simple case folding: two non-ASCII letters fold onto ASCII ones.
    return name.lower().replace("\u017f", "s").replace("\u212a", "k")


def auths_entries(
    document: object, source: str, *, tokens: bool = False
) -> list[tuple[str, Credential]]:
    """The ``(key, credential)`` pairs of a ``{"auths": {...}}`` document.

    Raises ConfigError when the kubelet would refuse the document.
    """
    if document is None:
        return []
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: a docker config must be a JSON object")
    auths: dict[str, Credential] = {}
    for name, value in go_fields(document):
        if name == "auths":
            if value is None:
                auths = {}  # Go sets the map to nil
            elif isinstance(value, dict):
                auths.update(credential_entries(value, source, tokens=tokens))
            else:
                raise ConfigError(f'{source}: "auths" must be a JSON object')
        elif name == "httpheaders":
            _check_string_map(value, '"HttpHeaders"', source)
    return list(auths.items())


def _members(document: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    members = document.members if isinstance(document, _Object) else document.items()
    return ((str(_go_string(name)), value) for name, value in members)


def _check_string_map(value: object, what: str, source: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or not all(
        v is None or isinstance(v, str) for _, v in _members(value)
    ):
        raise ConfigError(f"{source}: {what} must be a JSON object of strings")


def credential_entries(
    entries: Mapping[str, Any], source: str, *, tokens: bool = False
) -> list[tuple[str, Credential]]:
    """One credential per registry key; ConfigError when any entry is unusable.

    Every member is read, a repeated key included (Go decodes each, keeps the last).
    """
    found: dict[str, Credential] = {}
    for key, entry in _members(entries):
        found[key] = _credential(key, entry, source, tokens)
    return list(found.items())


def _credential(key: str, entry: object, source: str, tokens: bool) -> Credential:
    if entry is None:
        return Credential("", "", source)
    if not isinstance(entry, dict):
        raise ConfigError(f"{source}: registry {key!r}: the entry is not a JSON object")
    wanted = (*_KUBELET_FIELDS, *_TOKEN_FIELDS) if tokens else _KUBELET_FIELDS
    fields: dict[str, str] = {}
    for name, value in go_fields(entry):
        if name not in wanted or value is None:
            continue
        if not isinstance(value, str):
            raise ConfigError(f"{source}: registry {key!r}: {name!r} is not a string")
        fields[name] = _go_string(value)
    username, password = fields.get("username", ""), fields.get("password", "")
    if fields.get("auth"):
        try:
            username, password = decode_auth(fields["auth"])
        except ValueError as exc:
            raise ConfigError(f"{source}: registry {key!r}: {exc}") from None
    return Credential(
        username,
        password,
        source,
        identity_token=fields.get("identitytoken", ""),
        registry_token=fields.get("registrytoken", ""),
    )
