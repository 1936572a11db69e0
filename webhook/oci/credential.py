"""Credentials: the values shared by the keychain (where credentials come from), the registry
client (where they are used), and the locator and pull-secret sources (whose they are)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Credential:
    """A username and password (or identity token) for one registry.

    ``source`` says where it came from (``secret ns/name``, ``docker config /path``) for
    messages; the password never appears in ``repr`` so it cannot leak into a log.
    """

    username: str
    password: str = field(repr=False)
    source: str = ""

    def identity(self) -> str:
        """A key that tells credentials apart in caches without holding the secret in clear."""
        digest = hashlib.sha256(f"{self.username}\0{self.password}".encode()).hexdigest()
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
    key: str = field(init=False, default="")

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", "|".join(c.identity() for c in self.items))


ANONYMOUS = Credentials()
