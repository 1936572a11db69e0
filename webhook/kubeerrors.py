"""Errors of the Kubernetes API client, mapped to pinhook's in one place.

After kopf's ``clients/errors``: lightkube raises ``ApiError`` (an ``httpx2.HTTPStatusError``
carrying the API server's Status) for an error answer, ``httpx2`` transport errors when the API
server cannot be reached, and its own ``ConfigError`` when there is no usable kubeconfig.
:func:`kube_errors` turns each into a :class:`KubeError` subclass that says what it means
(not found, conflict, refused, ...), so a caller catches the outcomes it handles by meaning
and words the rest for its own reader.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx2
from lightkube import ApiError
from lightkube.core.exceptions import ConfigError as LightkubeConfigError

from .errors import PinhookError


class KubeError(PinhookError):
    """A request to the Kubernetes API failed while doing ``what``.

    ``code`` is the HTTP status, None when no answer came; ``detail`` says why, without
    ``what`` (``403 Forbidden: secrets is forbidden: ...``).
    """

    def __init__(self, what: str, detail: str, code: int | None = None) -> None:
        super().__init__(f"{what}: {detail}")
        self.what = what
        self.detail = detail
        self.code = code


class KubeUnconfigured(KubeError):
    """No usable kubeconfig or in-cluster configuration."""


class KubeUnreachable(KubeError):
    """The API server did not answer."""


class KubeRefused(KubeError):
    """401 or 403: the credentials or RBAC do not allow it."""


class KubeNotFound(KubeError):
    """404."""


class KubeConflict(KubeError):
    """409: AlreadyExists, or a Conflict with a newer resourceVersion."""


class KubeExpired(KubeError):
    """410 Gone: the resourceVersion a watch started from was compacted away."""


class KubeInvalid(KubeError):
    """422: the request was refused as invalid (a JSON patch ``test`` that failed, too)."""


_BY_CODE: dict[int, type[KubeError]] = {
    401: KubeRefused,
    403: KubeRefused,
    404: KubeNotFound,
    409: KubeConflict,
    410: KubeExpired,
    422: KubeInvalid,
}


def as_kube_error(exc: BaseException, what: str) -> KubeError | None:
    """The :class:`KubeError` for what the client raised while doing ``what``; None when
    ``exc`` is none of the client's errors."""
    if isinstance(exc, KubeError):
        return exc
    if isinstance(exc, ApiError):
        # A watch reports errors as events: such an ApiError has a Status but no response.
        status = exc.status
        code = status.code if status.code is not None else _response_code(exc)
        return _BY_CODE.get(code or 0, KubeError)(
            what, f"{code} {status.reason}: {status.message}", code
        )
    if isinstance(exc, httpx2.HTTPStatusError):
        code = exc.response.status_code
        detail = f"{code} {exc.response.reason_phrase}: {exc}"
        return _BY_CODE.get(code, KubeError)(what, detail, code)
    if isinstance(exc, httpx2.HTTPError):
        return KubeUnreachable(what, f"{type(exc).__name__}: {exc}")
    if isinstance(exc, LightkubeConfigError):
        return KubeUnconfigured(what, str(exc))
    return None


def _response_code(exc: httpx2.HTTPStatusError) -> int | None:
    response: httpx2.Response | None = exc.response
    return response.status_code if response is not None else None


@contextmanager
def kube_errors(what: str) -> Iterator[None]:
    """Run Kubernetes API calls; the client's errors come out as :class:`KubeError`."""
    try:
        yield
    except Exception as exc:
        error = as_kube_error(exc, what)
        if error is None or error is exc:
            raise
        raise error from exc
