"""Credentials: the values shared by the keychain (where credentials come from), the registry
client (where they are used), and the locator and pull-secret sources (whose they are)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Credential:
    """What one source offers for one registry.

    Either a username and password, or one of docker's tokens:

    * ``identity_token``: an OAuth2 refresh token (``identitytoken`` in a docker config, or a
      credential helper's answer for the username ``<token>``), to be exchanged at the
      registry's token endpoint with ``grant_type=refresh_token``;
    * ``registry_token``: a bearer token sent to the registry as it is (``registrytoken``).

    ``source`` says where it came from (``secret ns/name``, ``docker config /path``,
    ``credential provider ecr``) for messages; no secret part appears in ``repr``, so none can
    leak into a log.
    """

    username: str
    password: str = field(repr=False)
    source: str = ""
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    @property
    def is_empty(self) -> bool:
        """Nothing to send: what containerd turns into an anonymous pull."""
        return not (self.username or self.password or self.identity_token or self.registry_token)

    def identity(self) -> str:
        """A key that tells credentials apart in caches without holding the secret in clear."""
        secret = "\0".join((self.password, self.identity_token, self.registry_token))
        digest = hashlib.sha256(f"{self.username}\0{secret}".encode()).hexdigest()
        return f"{self.username}:{digest[:16]}"


@dataclass(frozen=True, slots=True)
class PullContext:
    """Where pull credentials for an image come from: the enclosing pod-spec-like object."""

    image_pull_secrets: tuple[str, ...] = ()  # names from imagePullSecrets[*].name
    service_account: str | None = None  # serviceAccountName, else deprecated serviceAccount


@dataclass(frozen=True, slots=True)
class Credentials:
    """The credentials that apply to one image for one object, in the order they are tried.

    ``key`` tells sets apart in caches: objects whose credentials are the same (none at all,
    most often) share lookups and their outcome; a different set never shares a failure.
    """

    items: tuple[Credential, ...] = ()
    # The credentials for each registry mirror, by the mirror's host, in mirror order: a
    # mirror gets only what was found for its own name, never the upstream's.
    mirrors: tuple[tuple[str, tuple[Credential, ...]], ...] = ()
    key: str = field(init=False, default="")

    def __post_init__(self) -> None:
        key = "|".join(c.identity() for c in self.items)
        for host, items in self.mirrors:
            if items:
                key += f"|{host}>" + ">".join(c.identity() for c in items)
        object.__setattr__(self, "key", key)

    def for_mirror(self, host: str) -> tuple[Credential, ...]:
        return next((items for mirror, items in self.mirrors if mirror == host), ())


ANONYMOUS = Credentials()
