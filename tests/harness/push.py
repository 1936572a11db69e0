"""Push real images to a registry over the distribution API, without docker.

Every pushed blob and manifest is random, so each push has fresh digests. Digests are the
sha256 of the exact bytes sent.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

import httpx

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
ALL_MANIFEST_TYPES = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT_ALL = ", ".join(ALL_MANIFEST_TYPES)

_CONFIG_TYPE = {
    OCI_MANIFEST: "application/vnd.oci.image.config.v1+json",
    DOCKER_MANIFEST: "application/vnd.docker.container.image.v1+json",
}
_LAYER_TYPE = {
    OCI_MANIFEST: "application/vnd.oci.image.layer.v1.tar+gzip",
    DOCKER_MANIFEST: "application/vnd.docker.image.rootfs.diff.tar.gzip",
}
_INDEX_CHILD_TYPE = {OCI_INDEX: OCI_MANIFEST, DOCKER_LIST: DOCKER_MANIFEST}
DEFAULT_PLATFORMS = (("linux", "amd64"), ("linux", "arm64"))


class PushError(RuntimeError):
    """The registry refused part of a push."""


def sha256_digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


@dataclass(frozen=True)
class PushedImage:
    """A manifest (or index) now stored under ``repo`` and, if given, ``tag``."""

    host: str
    repo: str
    tag: str | None
    digest: str
    media_type: str
    manifest: bytes
    manifest_digests: list[str] = field(default_factory=list)
    platforms: list[tuple[str, str]] = field(default_factory=list)

    @property
    def tag_ref(self) -> str:
        """``host/repo:tag``, the reference a Pod would carry."""
        if self.tag is None:
            raise ValueError("pushed by digest only")
        return f"{self.host}/{self.repo}:{self.tag}"

    @property
    def digest_ref(self) -> str:
        """``host/repo@sha256:…``, what pinning should produce."""
        return f"{self.host}/{self.repo}@{self.digest}"


class BearerChallengeAuth(httpx.Auth):
    """Answer a registry's ``Bearer`` challenge by fetching a token from its realm.

    Tokens are cached per challenge scope for the life of this object.
    """

    requires_response_body = True

    def __init__(self, username: str | None = None, password: str | None = None) -> None:
        self._basic = httpx.BasicAuth(username, password or "") if username else None
        self._tokens: dict[str, str] = {}

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        scope_key = _repository_of(request.url.path)
        if scope_key in self._tokens:
            request.headers["Authorization"] = f"Bearer {self._tokens[scope_key]}"
        response = yield request
        challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if response.status_code != 401 or challenge.get("scheme") != "bearer":
            return
        token_request = httpx.Request("GET", challenge["realm"], params=_token_params(challenge))
        if self._basic is not None:
            token_request = next(self._basic.auth_flow(token_request))
        token_response = yield token_request
        if token_response.status_code != 200:
            return
        body = json.loads(token_response.content)
        token = body.get("token") or body.get("access_token")
        self._tokens[scope_key] = token
        request.headers["Authorization"] = f"Bearer {token}"
        yield request


_REPO_PATH = re.compile(r"^/v2/(?P<name>.+?)/(?:manifests|blobs|tags)/")


def _repository_of(path: str) -> str:
    """Tokens are per repository: a push's POST and PUT share one."""
    match = _REPO_PATH.match(path)
    return match["name"] if match else path


def _token_params(challenge: dict[str, str]) -> dict[str, str]:
    return {key: challenge[key] for key in ("service", "scope") if key in challenge}


_PARAM = re.compile(r'(\w+)="([^"]*)"')


def parse_challenge(header: str) -> dict[str, str]:
    """``Bearer realm="…",service="…"`` → ``{"scheme": "bearer", "realm": …}``."""
    scheme, _, params = header.strip().partition(" ")
    if not scheme:
        return {}
    return {"scheme": scheme.lower(), **dict(_PARAM.findall(params))}


def _check(response: httpx.Response, expected: int, what: str) -> httpx.Response:
    if response.status_code != expected:
        raise PushError(f"{what}: {response.status_code} {response.text}")
    return response


def push_blob(client: httpx.Client, repo: str, data: bytes) -> str:
    """POST an upload, then PUT the bytes to its Location with ``&digest=`` appended."""
    digest = sha256_digest(data)
    started = _check(client.post(f"/v2/{repo}/blobs/uploads/"), 202, f"start upload to {repo}")
    location = started.headers["Location"]
    separator = "&" if "?" in location else "?"
    _check(
        client.put(
            f"{location}{separator}digest={digest}",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        ),
        201,
        f"upload {digest} to {repo}",
    )
    return digest


def put_manifest(
    client: httpx.Client, repo: str, reference: str, body: bytes, media_type: str
) -> str:
    """PUT a manifest under a tag or its digest; returns the digest of ``body``."""
    response = _check(
        client.put(
            f"/v2/{repo}/manifests/{reference}", content=body, headers={"Content-Type": media_type}
        ),
        201,
        f"put manifest {repo}:{reference}",
    )
    digest = sha256_digest(body)
    stored = response.headers.get("Docker-Content-Digest")
    if stored is not None and stored != digest:
        raise PushError(f"registry stored {stored}, we sent {digest}")
    return digest


def _descriptor(media_type: str, data: bytes, **extra: object) -> dict[str, object]:
    return {"mediaType": media_type, "size": len(data), "digest": sha256_digest(data), **extra}


def _image_manifest_bytes(
    client: httpx.Client, repo: str, media_type: str, os_name: str, arch: str, layers: int
) -> bytes:
    blobs = [os.urandom(128) for _ in range(layers)]
    config = json.dumps(
        {
            "architecture": arch,
            "os": os_name,
            "config": {"Env": [f"PINHOOK_NONCE={os.urandom(8).hex()}"]},
            "rootfs": {"type": "layers", "diff_ids": [sha256_digest(b) for b in blobs]},
        }
    ).encode()
    for blob in [config, *blobs]:
        push_blob(client, repo, blob)
    manifest = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": _descriptor(_CONFIG_TYPE[media_type], config),
        "layers": [_descriptor(_LAYER_TYPE[media_type], blob) for blob in blobs],
    }
    return json.dumps(manifest, indent=2).encode()


def _host(client: httpx.Client) -> str:
    return client.base_url.netloc.decode()


def push_image(
    client: httpx.Client,
    repo: str,
    tag: str | None,
    media_type: str = OCI_MANIFEST,
    *,
    platform: tuple[str, str] = ("linux", "amd64"),
    layers: int = 1,
) -> PushedImage:
    """One single-platform image manifest, by ``tag`` (or by digest only when ``tag`` is None)."""
    if media_type not in _CONFIG_TYPE:
        raise ValueError(f"not an image manifest type: {media_type}")
    body = _image_manifest_bytes(client, repo, media_type, *platform, layers)
    digest = put_manifest(client, repo, tag or sha256_digest(body), body, media_type)
    return PushedImage(_host(client), repo, tag, digest, media_type, body, [], [platform])


def push_index(
    client: httpx.Client,
    repo: str,
    tag: str | None,
    media_type: str = OCI_INDEX,
    *,
    platforms: Sequence[tuple[str, str]] = DEFAULT_PLATFORMS,
) -> PushedImage:
    """A multi-platform index: platform manifests by digest first, then the index by tag."""
    child_type = _INDEX_CHILD_TYPE[media_type]
    entries = []
    for os_name, arch in platforms:
        child = push_image(client, repo, None, child_type, platform=(os_name, arch))
        entries.append(
            _descriptor(child_type, child.manifest, platform={"architecture": arch, "os": os_name})
        )
    body = json.dumps({"schemaVersion": 2, "mediaType": media_type, "manifests": entries}).encode()
    digest = put_manifest(client, repo, tag or sha256_digest(body), body, media_type)
    children = [str(entry["digest"]) for entry in entries]
    return PushedImage(
        _host(client), repo, tag, digest, media_type, body, children, list(platforms)
    )


def tag_existing(client: httpx.Client, image: PushedImage, tag: str) -> PushedImage:
    """Point ``tag`` at an already pushed manifest (re-PUT of its exact bytes)."""
    put_manifest(client, image.repo, tag, image.manifest, image.media_type)
    return PushedImage(
        image.host,
        image.repo,
        tag,
        image.digest,
        image.media_type,
        image.manifest,
        image.manifest_digests,
        image.platforms,
    )


def move_tag(client: httpx.Client, image: PushedImage) -> PushedImage:
    """Push a new image of the same kind under ``image.tag``; the tag now has a new digest."""
    if image.tag is None:
        raise ValueError("image has no tag to move")
    if image.media_type in _INDEX_CHILD_TYPE:
        return push_index(
            client, image.repo, image.tag, image.media_type, platforms=image.platforms
        )
    return push_image(client, image.repo, image.tag, image.media_type, platform=image.platforms[0])


def delete_manifest(client: httpx.Client, repo: str, digest: str) -> None:
    """Delete a manifest by digest (the registry has ``storage.delete.enabled``)."""
    _check(client.delete(f"/v2/{repo}/manifests/{digest}"), 202, f"delete {repo}@{digest}")


def head_manifest(client: httpx.Client, repo: str, reference: str) -> httpx.Response:
    """HEAD with the full Accept list, as pinhook asks."""
    return client.head(f"/v2/{repo}/manifests/{reference}", headers={"Accept": ACCEPT_ALL})


@dataclass
class Pusher:
    """Push helpers bound to one authenticated client."""

    client: httpx.Client

    def image(
        self, repo: str, tag: str | None = "latest", media_type: str = OCI_MANIFEST
    ) -> PushedImage:
        return push_image(self.client, repo, tag, media_type)

    def index(
        self, repo: str, tag: str | None = "latest", media_type: str = OCI_INDEX
    ) -> PushedImage:
        return push_index(self.client, repo, tag, media_type)

    def tag(self, image: PushedImage, tag: str) -> PushedImage:
        return tag_existing(self.client, image, tag)

    def move_tag(self, image: PushedImage) -> PushedImage:
        return move_tag(self.client, image)

    def delete(self, image: PushedImage) -> None:
        delete_manifest(self.client, image.repo, image.digest)

    def head(self, repo: str, reference: str) -> httpx.Response:
        return head_manifest(self.client, repo, reference)
