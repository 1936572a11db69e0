"""Registry mirrors, in the spirit of containerd's ``hosts.toml``: hosts asked, in order, to
resolve a registry's tags before the registry itself.

A mirror is written as ``https://host[:port]``, ``http://host[:port]``, or a bare
``host[:port]`` (reached like any registry: HTTPS unless listed as insecure). Requests to it
carry ``?ns=<registry>``, as containerd's do, so one mirror can serve several registries.
A path (containerd's ``override_path`` for registries that do not serve ``/v2/`` at the root)
is not supported: the token scope would name a repository the mirror does not have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .reference import DOCKER_HUB, DOCKER_HUB_LEGACY, ImageRef

SCHEMES: Final = ("https", "http")


@dataclass(frozen=True, slots=True)
class Mirror:
    """One mirror: its scheme (``None`` when written bare) and ``host[:port]``."""

    scheme: str | None
    host: str

    @classmethod
    def parse(cls, text: str) -> Mirror:
        """Raises ValueError saying what is wrong with ``text``."""
        if "@" in text:  # never echo a password written into the URL
            raise ValueError("a mirror URL must not hold a user or password")
        scheme, sep, rest = text.strip().partition("://")
        if not sep:
            scheme, rest = "", scheme
        elif scheme.lower() not in SCHEMES:
            raise ValueError(f"mirror {text!r}: the scheme must be https or http")
        host = rest.removesuffix("/")
        if any(ch in host for ch in "/?#"):
            raise ValueError(f"mirror {text!r}: write scheme://host[:port], with no path or query")
        try:
            ImageRef(host.lower(), "mirror")
        except ValueError as exc:
            raise ValueError(f"mirror {text!r}: {host!r} is not a registry host ({exc})") from None
        return cls(scheme.lower() or None, host.lower())

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}" if self.scheme else self.host

    def image(self, ref: ImageRef) -> ImageRef:
        """``ref`` as found on this mirror: the same repository, tag and digest."""
        return ImageRef(self.host, ref.repository, ref.tag, ref.digest)


def registry_name(text: str) -> str:
    """The normalised registry a mirror list is for (``index.docker.io`` is ``docker.io``);
    ValueError if ``text`` is no registry name."""
    written = text.strip()
    name = written.lower()  # host names are case-insensitive; look-ups lower-case too
    if name == DOCKER_HUB_LEGACY:
        return DOCKER_HUB
    try:
        ImageRef(written, "library/x" if name == DOCKER_HUB else "x")
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a registry name ({exc})") from None
    return name
