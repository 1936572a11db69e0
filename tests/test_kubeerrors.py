"""The one mapping from the Kubernetes client's errors to pinhook's."""

from __future__ import annotations

import httpx2
import pytest
from lightkube import ApiError
from lightkube.core.exceptions import ConfigError as LightkubeConfigError
from lightkube.models.meta_v1 import Status

from webhook.kubeerrors import (
    KubeConflict,
    KubeError,
    KubeExpired,
    KubeInvalid,
    KubeNotFound,
    KubeRefused,
    KubeUnconfigured,
    KubeUnreachable,
    as_kube_error,
    kube_errors,
)


def api_error(code: int, reason: str = "Reason", *, with_response: bool = True) -> ApiError:
    status = Status(code=code, reason=reason, message="the message")
    if not with_response:  # how a watch reports an ERROR event
        return ApiError(status=status)
    request = httpx2.Request("GET", "https://api.example/api/v1/secrets")
    return ApiError(request=request, response=httpx2.Response(code, json=status.to_dict()))


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (401, KubeRefused),
        (403, KubeRefused),
        (404, KubeNotFound),
        (409, KubeConflict),
        (410, KubeExpired),
        (422, KubeInvalid),
        (500, KubeError),
    ],
)
def test_status_codes_map_to_their_meaning(code: int, kind: type[KubeError]) -> None:
    for exc in (api_error(code), api_error(code, with_response=False)):
        error = as_kube_error(exc, "reading secret a/b")
        assert type(error) is kind
        assert error.code == code
        assert str(error) == f"reading secret a/b: {code} Reason: the message"


def test_no_answer_no_kubeconfig_and_other_errors() -> None:
    unreachable = as_kube_error(httpx2.ConnectError("refused"), "x")
    assert isinstance(unreachable, KubeUnreachable) and unreachable.code is None
    assert unreachable.detail == "ConnectError: refused"
    assert isinstance(as_kube_error(LightkubeConfigError("no config"), "x"), KubeUnconfigured)
    assert as_kube_error(ValueError("a bug"), "x") is None


def test_kube_errors_translates_and_chains() -> None:
    with pytest.raises(KubeNotFound) as caught, kube_errors("reading secret a/b"):
        raise api_error(404)
    assert isinstance(caught.value.__cause__, ApiError)
    with pytest.raises(ValueError, match="a bug"), kube_errors("x"):
        raise ValueError("a bug")
