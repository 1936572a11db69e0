"""One exception hierarchy for pinhook, in the manner of httpx.

Every error pinhook raises on purpose derives from :class:`PinhookError`, so callers can
catch one type at an edge (the CLI, the HTTP handler) and turn it into a clear message.
"""

from __future__ import annotations

from .redact import scrub


class PinhookError(Exception):
    """Base class of every error pinhook raises on purpose."""


class InvalidReference(PinhookError, ValueError):
    """A string is not a valid image reference under the distribution/reference grammar."""


class ConfigError(PinhookError, ValueError):
    """A configuration document (rewrite map and settings) is invalid.

    ``errors`` lists one human-readable line per problem, each naming the field.
    """

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        self.message = message
        self.errors = errors or []
        detail = "".join(f"\n  - {line}" for line in self.errors)
        super().__init__(f"{message}{detail}")


class InvalidReview(PinhookError, ValueError):
    """A request body is not a usable AdmissionReview."""


class ResolveError(PinhookError):
    """A tag could not be resolved to a digest.

    ``reason`` is a short machine-friendly word used in metrics and audit annotations
    (``not-found``, ``unauthorized``, ``timeout``, ``unavailable``, ``forbidden-host``,
    ``digest-mismatch``, ``protocol``); the message is for people.
    """

    reason = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        # The message often quotes a registry's answer: scrubbed here, once for every path it
        # takes (warnings, audit annotations, logs).
        super().__init__(scrub(message))
        if reason is not None:
            self.reason = reason


class NotFound(ResolveError):
    reason = "not-found"


class Unauthorized(ResolveError):
    reason = "unauthorized"


class DeadlineExceeded(ResolveError):
    reason = "timeout"


class RegistryUnavailable(ResolveError):
    """5xx, 429 after retries, connection failures: the registry may recover."""

    reason = "unavailable"


class ForbiddenHost(ResolveError):
    """The server-side request forgery guard refused a host."""

    reason = "forbidden-host"


class DigestMismatch(ResolveError):
    reason = "digest-mismatch"


class ProtocolError(ResolveError):
    """The registry answered something that does not follow the distribution API."""

    reason = "protocol"


def error_for(reason: str, message: str) -> ResolveError:
    """The error of ``reason`` (as another replica reported it), as its own class when pinhook
    has one, so that it is counted and decided on as if it had happened here."""
    for kind in (
        NotFound,
        Unauthorized,
        DeadlineExceeded,
        RegistryUnavailable,
        ForbiddenHost,
        DigestMismatch,
        ProtocolError,
    ):
        if kind.reason == reason:
            return kind(message)
    return ResolveError(message, reason=reason)


class CertificateError(PinhookError):
    """Certificates could not be generated, loaded or stored."""
