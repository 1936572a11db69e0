"""A loopback fake of the kube-apiserver: list and watch of core/v1 Secrets and ServiceAccounts,
reads and writes of single objects, MutatingWebhookConfigurations and
ValidatingAdmissionPolicies.

No real apiserver can run on this machine, so this implements just what a reflector uses, on a
raw asyncio HTTP/1.1 server in the test's own event loop:

* ``GET /api/v1/{secrets,serviceaccounts}`` and ``/api/v1/namespaces/NS/...``: a List with
  ``metadata.resourceVersion``, filtered by ``fieldSelector`` (``a=b``, ``a==b``, ``a!=b``);
* the same with ``watch=true``: newline-delimited JSON events over a chunked response, starting
  after ``resourceVersion`` (replayed from history), or with synthetic ADDED events for the
  current state when none is given; a resourceVersion older than the compacted history gets an
  ``ERROR`` event with a 410 ``Expired`` Status, as the real server answers;
* on demand: an ERROR 410 to every open watch (:meth:`expire`), an HTTP error status to the next
  list or watch (:meth:`fail_next`), a clean close of open watches (:meth:`close_watches`), and
  changes that no watch sees (``notify=False``, as if the events were compacted away);
* single objects: ``GET`` and ``PUT`` of ``/api/v1/namespaces/NS/PLURAL/NAME`` (PUT checks
  ``metadata.resourceVersion`` and answers 409 ``Conflict`` on a mismatch), ``POST`` to the
  namespaced collection (409 ``AlreadyExists`` for a name in use), and ``GET``/``PATCH`` (JSON
  patch, where a failed ``test`` gives 422, or JSON merge patch) of
  ``/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/NAME`` (and
  ``validatingadmissionpolicies/NAME``); a missing object is 404 ``NotFound``;
* on demand, any request may be failed with a status (:meth:`fail_next` with ``method``) or
  preceded by a hook (:meth:`before`) that changes state or waits, to stage races.

Every request is recorded in :attr:`requests` so tests can count API calls.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonpatch

# Resources that can be listed and watched (core/v1, namespaced).
KINDS = {"secrets": "Secret", "serviceaccounts": "ServiceAccount"}
# Cluster-scoped resources served as single objects only, with their API path prefix.
CLUSTER_KINDS = {
    "mutatingwebhookconfigurations": "MutatingWebhookConfiguration",
    "validatingadmissionpolicies": "ValidatingAdmissionPolicy",
}
_API_PREFIX = {
    **dict.fromkeys(KINDS, "/api/v1"),
    **dict.fromkeys(CLUSTER_KINDS, "/apis/admissionregistration.k8s.io/v1"),
}
_PATH = re.compile(
    r"(?P<prefix>/api/v1|/apis/[^/]+/[^/]+)(?:/namespaces/(?P<ns>[^/]+))?"
    r"/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?"
)
_CLOSE = object()

Obj = dict[str, Any]


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    params: dict[str, str]
    body: bytes = b""
    content_type: str = ""

    @property
    def plural(self) -> str:
        route = _PATH.fullmatch(self.path)
        return route["plural"] if route else self.path.rsplit("/", 1)[-1]

    @property
    def name(self) -> str | None:
        route = _PATH.fullmatch(self.path)
        return route["name"] if route else None

    @property
    def watch(self) -> bool:
        return self.params.get("watch") in ("true", "1")

    def json(self) -> Any:
        return json.loads(self.body)


Hook = Callable[[RecordedRequest], Awaitable[None] | None]


@dataclass
class _Hook:
    method: str
    plural: str
    hook: Hook
    times: int


@dataclass(frozen=True)
class _Failure:
    plural: str
    watch: bool
    status: int
    method: str


@dataclass
class _Watch:
    plural: str
    namespace: str | None
    selector: list[tuple[str, bool, str]]
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)


def secret(
    namespace: str,
    name: str,
    document: dict[str, Any],
    *,
    secret_type: str = "kubernetes.io/dockerconfigjson",
) -> Obj:
    """A pull Secret manifest holding ``document`` as its base64 data."""
    data_key = ".dockercfg" if secret_type == "kubernetes.io/dockercfg" else ".dockerconfigjson"
    encoded = base64.b64encode(json.dumps(document).encode()).decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"namespace": namespace, "name": name},
        "type": secret_type,
        "data": {data_key: encoded},
    }


def service_account(namespace: str, name: str, pull_secrets: list[str]) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"namespace": namespace, "name": name},
        "imagePullSecrets": [{"name": n} for n in pull_secrets],
    }


class FakeApiServer:
    def __init__(self) -> None:
        self._objects: dict[str, dict[tuple[str, str], Obj]] = {
            p: {} for p in (*KINDS, *CLUSTER_KINDS)
        }
        self._rv = 100
        self._history: list[tuple[int, str, str, Obj]] = []  # (rv, plural, type, object)
        self._oldest_rv = self._rv
        self._watches: list[_Watch] = []
        self._failures: list[_Failure] = []
        self._hooks: list[_Hook] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.requests: list[RecordedRequest] = []
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- changing state ----------------------------------------------------------------

    def put(self, obj: Obj, *, notify: bool = True) -> Obj:
        """Create or replace an object; open watches see ADDED or MODIFIED."""
        plural = _plural_of(obj)
        stored = copy.deepcopy(obj)
        metadata = stored.setdefault("metadata", {})
        key = (metadata.get("namespace", ""), metadata["name"])
        old = self._objects[plural].get(key)
        metadata["uid"] = old["metadata"]["uid"] if old else str(uuid.uuid4())
        metadata["resourceVersion"] = self._bump(notify)
        self._objects[plural][key] = stored
        self._emit(plural, "MODIFIED" if old else "ADDED", stored, old, notify)
        return copy.deepcopy(stored)

    def get(self, plural: str, namespace: str, name: str) -> Obj | None:
        """A copy of the stored object (``namespace`` is ``""`` for cluster-scoped ones)."""
        stored = self._objects[plural].get((namespace, name))
        return copy.deepcopy(stored) if stored is not None else None

    def delete(self, plural: str, namespace: str, name: str, *, notify: bool = True) -> None:
        old = self._objects[plural].pop((namespace, name))
        gone = copy.deepcopy(old)
        gone["metadata"]["resourceVersion"] = self._bump(notify)
        self._emit(plural, "DELETED", gone, old, notify)

    def expire(self) -> None:
        """Compact all history and end every open watch with ERROR 410, as etcd compaction does."""
        self._oldest_rv = self._rv
        self._history.clear()
        for watch in self._watches:
            watch.queue.put_nowait(_event_line("ERROR", _status(410, "Expired", "too old")))
            watch.queue.put_nowait(_CLOSE)

    def close_watches(self) -> None:
        """End every open watch cleanly (a client then rewatches from its last version)."""
        for watch in self._watches:
            watch.queue.put_nowait(_CLOSE)

    def fail_next(self, plural: str, *, watch: bool, status: int, method: str = "GET") -> None:
        """Answer the next list (or watch) of ``plural`` with this HTTP error status.

        With another ``method`` (``POST``, ``PUT``, ``PATCH``), the next such request instead.
        """
        self._failures.append(_Failure(plural, watch, status, method))

    def before(self, method: str, plural: str, hook: Hook, *, times: int = 1) -> None:
        """Run ``hook`` (sync or async) before serving each of the next ``times`` requests with
        this method on ``plural``: to change state between a client's read and its write, or to
        hold requests until others arrive."""
        self._hooks.append(_Hook(method, plural, hook, times))

    # -- observing ---------------------------------------------------------------------

    def count(
        self, plural: str | None = None, *, watch: bool | None = None, method: str | None = None
    ) -> int:
        return sum(
            1
            for r in self.requests
            if (plural is None or r.plural == plural)
            and (watch is None or r.watch is watch)
            and (method is None or r.method == method)
        )

    def open_watches(self, plural: str) -> int:
        return sum(1 for w in self._watches if w.plural == plural)

    # -- internals: state --------------------------------------------------------------

    def _bump(self, notify: bool) -> str:
        self._rv += 1
        if not notify:
            # The change's event is lost to compaction: a watch from before it must relist.
            self._oldest_rv = self._rv
            self._history.clear()
        return str(self._rv)

    def _emit(self, plural: str, event: str, obj: Obj, old: Obj | None, notify: bool) -> None:
        if not notify:
            return
        self._history.append((self._rv, plural, event, obj))
        for watch in self._watches:
            if watch.plural != plural:
                continue
            was, now = old is not None and _matches(watch, old), _matches(watch, obj)
            if event == "DELETED":
                kind = "DELETED" if was else None
            elif now:
                kind = "MODIFIED" if was else "ADDED"
            else:
                kind = "DELETED" if was else None
            if kind is not None:
                watch.queue.put_nowait(_event_line(kind, obj))

    # -- internals: HTTP ---------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while await self._serve_one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # see below
        finally:
            self._handlers.discard(task)
            writer.close()
            # close() cancels handlers, idle or closing. Ending normally instead of cancelled
            # keeps Python 3.11's stream callback (task.exception() on a cancelled task) from
            # logging an "Exception in callback" error for each of them.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection is done."""
        request_line = await reader.readline()
        if not request_line:
            return False
        method, target, _ = request_line.decode("latin-1").split(" ", 2)
        headers = await _read_headers(reader)
        length = int(headers.get("content-length", "0"))
        body = await reader.readexactly(length) if length else b""
        url = urlsplit(target)
        params = {k: v[0] for k, v in parse_qs(url.query).items()}
        request = RecordedRequest(
            method, url.path, params, body, headers.get("content-type", "").split(";")[0]
        )
        self.requests.append(request)
        route = _PATH.fullmatch(url.path)
        if route is None or _API_PREFIX.get(route["plural"]) != route["prefix"]:
            await _send_json(writer, 404, _status(404, "NotFound", f"no route for {url.path}"))
            return True
        plural, namespace, name = route["plural"], route["ns"], route["name"]
        await self._run_hooks(request)
        failure = self._take_failure(plural, request.watch, method)
        if failure is not None:
            await _send_json(writer, failure, _status(failure, "Injected", "injected failure"))
            return True
        if method == "GET" and name is None and plural in KINDS:
            if request.watch:
                await self._serve_watch(writer, plural, namespace, params)
                return False
            await _send_json(writer, 200, self._list(plural, namespace, params))
            return True
        status, answer = self._serve_object(request, plural, namespace or "", name)
        await _send_json(writer, status, answer)
        return True

    def _take_failure(self, plural: str, watch: bool, method: str) -> int | None:
        for i, failure in enumerate(self._failures):
            if (failure.plural, failure.watch, failure.method) == (plural, watch, method):
                del self._failures[i]
                return failure.status
        return None

    async def _run_hooks(self, request: RecordedRequest) -> None:
        for hook in list(self._hooks):
            if (hook.method, hook.plural) != (request.method, request.plural):
                continue
            hook.times -= 1
            if hook.times <= 0:
                self._hooks.remove(hook)
            result = hook.hook(request)
            if result is not None:
                await result

    # -- internals: single objects -----------------------------------------------------

    def _serve_object(
        self, request: RecordedRequest, plural: str, namespace: str, name: str | None
    ) -> tuple[int, Obj]:
        """Answer GET/PUT/PATCH of one object or POST to a collection: (status, body)."""
        if request.method == "POST" and name is None:
            return self._create(plural, namespace, request.json())
        if name is None:
            return 405, _status(405, "MethodNotAllowed", f"{request.method} of a collection")
        current = self._objects[plural].get((namespace, name))
        if current is None:
            return 404, _status(404, "NotFound", f'{plural} "{name}" not found')
        if request.method == "GET":
            return 200, current
        if request.method == "PUT":
            return self._update(plural, current, request.json())
        if request.method == "PATCH":
            return self._patch(plural, current, request)
        return 405, _status(405, "MethodNotAllowed", f"{request.method} is not served")

    def _create(self, plural: str, namespace: str, body: Obj) -> tuple[int, Obj]:
        metadata = body.setdefault("metadata", {})
        name = metadata.get("name", "")
        if (namespace, name) in self._objects[plural]:
            return 409, _status(409, "AlreadyExists", f'{plural} "{name}" already exists')
        if namespace:
            metadata["namespace"] = namespace
        metadata.pop("resourceVersion", None)
        return 201, self.put(body)

    def _update(self, plural: str, current: Obj, body: Obj) -> tuple[int, Obj]:
        name = current["metadata"]["name"]
        wanted = body.get("metadata", {}).get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            return 409, _status(409, "Conflict", _conflict_message(plural, name))
        body.setdefault("metadata", {})["namespace"] = current["metadata"].get("namespace", "")
        if not body["metadata"]["namespace"]:
            del body["metadata"]["namespace"]
        return 200, self.put(body)

    def _patch(self, plural: str, current: Obj, request: RecordedRequest) -> tuple[int, Obj]:
        name = current["metadata"]["name"]
        if request.content_type == "application/json-patch+json":
            try:
                patched = jsonpatch.apply_patch(current, request.json())
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                return 422, _status(422, "Invalid", f"json patch: {exc}")
        elif request.content_type == "application/merge-patch+json":
            patched = _merge_patch(current, request.json())
        else:
            return 415, _status(415, "UnsupportedMediaType", request.content_type)
        # As the real server does: a resourceVersion set by the patch is a precondition.
        if patched["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            return 409, _status(409, "Conflict", _conflict_message(plural, name))
        return 200, self.put(patched)

    def _list(self, plural: str, namespace: str | None, params: dict[str, str]) -> Obj:
        probe = _Watch(plural, namespace, _parse_selector(params.get("fieldSelector", "")))
        items = [o for o in self._objects[plural].values() if _matches(probe, o)]
        return {
            "apiVersion": "v1",
            "kind": f"{KINDS[plural]}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": items,
        }

    async def _serve_watch(
        self,
        writer: asyncio.StreamWriter,
        plural: str,
        namespace: str | None,
        params: dict[str, str],
    ) -> None:
        watch = _Watch(plural, namespace, _parse_selector(params.get("fieldSelector", "")))
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        since = params.get("resourceVersion", "")
        if since in ("", "0"):
            for obj in self._objects[plural].values():
                if _matches(watch, obj):
                    watch.queue.put_nowait(_event_line("ADDED", obj))
        elif int(since) < self._oldest_rv:
            message = f"too old resource version: {since} ({self._oldest_rv})"
            watch.queue.put_nowait(_event_line("ERROR", _status(410, "Expired", message)))
            watch.queue.put_nowait(_CLOSE)
        else:
            for rv, p, event, obj in self._history:
                if rv > int(since) and p == plural and _matches(watch, obj):
                    watch.queue.put_nowait(_event_line(event, obj))
        # No await between the replay above and this registration, so no event falls between.
        self._watches.append(watch)
        try:
            while (line := await watch.queue.get()) is not _CLOSE:
                assert isinstance(line, bytes)
                writer.write(b"%x\r\n%s\r\n" % (len(line), line))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            self._watches.remove(watch)


def _plural_of(obj: Obj) -> str:
    return {kind: plural for plural, kind in (*KINDS.items(), *CLUSTER_KINDS.items())}[obj["kind"]]


async def _read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (lists are replaced whole)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _conflict_message(plural: str, name: str) -> str:
    return (
        f'Operation cannot be fulfilled on {plural} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )


def _field(obj: Obj, path: str) -> str | None:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return None if value is None else str(value)


def _parse_selector(text: str) -> list[tuple[str, bool, str]]:
    terms = []
    for term in filter(None, text.split(",")):
        if "!=" in term:
            name, value = term.split("!=", 1)
            terms.append((name, False, value))
        else:
            name, value = re.split("==?", term, maxsplit=1)
            terms.append((name, True, value))
    return terms


def _matches(watch: _Watch, obj: Obj) -> bool:
    if watch.namespace is not None and obj["metadata"]["namespace"] != watch.namespace:
        return False
    return all((_field(obj, name) == value) is equal for name, equal, value in watch.selector)


def _status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _event_line(event: str, obj: Obj) -> bytes:
    return json.dumps({"type": event, "object": obj}).encode() + b"\n"


async def _send_json(writer: asyncio.StreamWriter, status: int, body: Obj) -> None:
    payload = json.dumps(body).encode()
    writer.write(
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
