"""Reviews that differ only in their uid (``webhook.answers``): the first one's answer serves
the next ones, each with its own uid, while the decision still stands, and never otherwise.
Through the ASGI app, against a real registry whose tags move."""

from __future__ import annotations

import base64
import copy
import logging
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import orjson
import pytest

from tests.harness.fixtures import RegistryEnv
from tests.registry_mutators import Clock, registry_mutator
from tests.reviews import plain_pod, review
from webhook.admission import AdmissionRequest
from webhook.answers import SEEN_SIZE, Answers, like_review
from webhook.app import create_app
from webhook.config import load_settings
from webhook.decide import Decision
from webhook.kinds import Mode
from webhook.logs import Line
from webhook.metrics import Metrics
from webhook.mutate import Mutator
from webhook.plan import RequestPlan


class Webhook:
    """pinhook's ASGI app over a real registry, its mutator swappable as a reload swaps it."""

    def __init__(self, mutator: Mutator) -> None:
        self.metrics = mutator.metrics
        self.mutator = mutator
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(self)), base_url="http://webhook"
        )

    def readiness(self) -> tuple[bool, str]:
        return True, "ok"

    async def post(self, body: bytes) -> httpx.Response:
        return await self.client.post("/mutate", content=body)

    async def answer(self, doc: dict[str, Any]) -> dict[str, Any]:
        reply = await self.post(orjson.dumps(doc))
        assert reply.status_code == 200, reply.text
        response: dict[str, Any] = reply.json()["response"]
        assert response["uid"] == doc["request"]["uid"]
        return response

    def recalled(self) -> float:
        return self.metrics.registry.get_sample_value("pinhook_answers_recalled_total") or 0.0


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as stack:
        yield stack


async def webhook(stack: AsyncExitStack, host: str, clock: Clock, extra: str = "") -> Webhook:
    hook = Webhook(await registry_mutator(stack, host, clock, extra))
    stack.push_async_callback(hook.client.aclose)
    return hook


def replica(obj: dict[str, Any]) -> dict[str, Any]:
    """The review of one more Pod of a ReplicaSet: the same as the last but for its uid."""
    return review(copy.deepcopy(obj), namespace="web")


def patched_images(response: dict[str, Any]) -> list[str]:
    return [op["value"] for op in orjson.loads(base64.b64decode(response.get("patch", "")))]


async def test_replicas_get_the_first_answer_each_with_its_own_uid(
    registry: RegistryEnv, stack: AsyncExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    images = [registry.push.image("answers/app", "v1"), registry.push.image("answers/side", "v2")]
    hook = await webhook(stack, registry.host, Clock())
    pod = plain_pod(*[image.tag_ref for image in images], name="")
    with caplog.at_level(logging.INFO, logger="webhook.app"):
        answers = [await hook.answer(replica(pod)) for _ in range(4)]
    expected = [f"{image.tag_ref}@{image.digest}" for image in images]
    assert [patched_images(answer) for answer in answers] == [expected] * 4
    assert [{**answer, "uid": ""} for answer in answers[1:]] == [{**answers[0], "uid": ""}] * 3
    # The first was resolved and the second decided from the cache; the rest recalled that.
    assert hook.recalled() == 2
    logged = [getattr(r, "fields", {}).get("uid") for r in caplog.records if "admission" in r.msg]
    assert logged == [answer["uid"] for answer in answers]


async def test_reviews_none_is_like_keep_nothing_and_push_no_answer_out(
    registry: RegistryEnv, stack: AsyncExitStack
) -> None:
    """A key's first review is read as any other and its answer is not kept: reviews that
    all differ (600, past ``ANSWERS_SIZE``) leave a ReplicaSet's kept answer where it was."""
    image = registry.push.image("answers/kept", "v1")
    hook = await webhook(stack, registry.host, Clock())
    pod = plain_pod(image.tag_ref, name="")
    for _ in range(2):  # resolved, then decided from the cache and kept
        await hook.answer(replica(pod))
    assert hook.recalled() == 0
    for n in range(600):
        await hook.answer(replica(plain_pod(image.tag_ref, name=f"unlike-{n}")))
    assert hook.recalled() == 0
    await hook.answer(replica(pod))
    assert hook.recalled() == 1


def _tallies(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every count pinhook keeps per admission, by series (durations but their count)."""
    tallied = ("pinhook_admission", "pinhook_images", "pinhook_digest_cache", "pinhook_owner",
               "pinhook_answers", "pinhook_resolve_failures")  # fmt: skip
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name.startswith(tallied)
        and not sample.name.endswith(("_bucket", "_sum", "_created"))
    }


@pytest.mark.parametrize("owned", [False, True], ids=["plain", "owned"])
async def test_an_answer_recalled_while_it_stands_counts_as_its_first_recall_did(
    registry: RegistryEnv, stack: AsyncExitStack, owned: bool
) -> None:
    """The first review is resolved, the second decided from the cache, the third found to
    stand on the cache's entries and recalled; from the fourth on, the answer is recalled
    from those entries without deciding anything (Mutator.standing). Each of those adds to
    the metrics exactly what the third added."""
    images = [registry.push.image("answers/count", "v1"), registry.push.image("answers/more", "v1")]
    hook = await webhook(stack, registry.host, Clock())
    pod = plain_pod(*[image.tag_ref for image in images], name="")
    if owned:
        pod["metadata"]["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web", "uid": "rs-1",
             "controller": True}
        ]  # fmt: skip
    settled = 0
    settle = hook.mutator.settled

    def counted_settled(plan: RequestPlan) -> object:
        nonlocal settled
        settled += 1
        return settle(plan)

    hook.mutator.settled = counted_settled  # type: ignore[method-assign]
    before = _tallies(hook.metrics)
    added = []
    for _ in range(6):
        await hook.answer(replica(pod))
        after = _tallies(hook.metrics)
        added.append({key: after[key] - before.get(key, 0.0) for key in after
                      if after[key] != before.get(key, 0.0)})  # fmt: skip
        before = after
    assert settled == 3  # the first three reviews; the other three took the standing path
    assert added[2][("pinhook_answers_recalled_total", ())] == 1
    assert added[2][("pinhook_digest_cache_events_total", (("event", "hit"),))] == 2
    if owned:
        assert added[2][("pinhook_owner_pins_total", (("event", "kept"),))] == 2
    assert added[3:] == [added[2]] * 3


async def test_a_review_that_differs_beyond_its_uid_is_answered_afresh(
    registry: RegistryEnv, stack: AsyncExitStack
) -> None:
    app, side = registry.push.image("answers/one", "v1"), registry.push.image("answers/two", "v1")
    hook = await webhook(stack, registry.host, Clock())
    pod = plain_pod(app.tag_ref, name="")
    for _ in range(3):
        await hook.answer(replica(pod))
    recalled = hook.recalled()
    other = plain_pod(side.tag_ref, name="")
    annotated = copy.deepcopy(pod)
    annotated["metadata"]["annotations"] = {"team": "a"}
    assert patched_images(await hook.answer(replica(other))) == [f"{side.tag_ref}@{side.digest}"]
    assert patched_images(await hook.answer(replica(annotated))) == [f"{app.tag_ref}@{app.digest}"]
    dry = review(copy.deepcopy(pod), namespace="web", dry_run=True)
    assert patched_images(await hook.answer(dry)) == [f"{app.tag_ref}@{app.digest}"]
    assert hook.recalled() == recalled


async def test_a_moved_tag_is_pinned_anew_once_the_cache_learns_it(
    registry: RegistryEnv, stack: AsyncExitStack
) -> None:
    clock = Clock()
    image = registry.push.image("answers/moving", "stable")
    hook = await webhook(stack, registry.host, clock)
    pod = plain_pod(image.tag_ref, name="")
    for _ in range(3):
        assert patched_images(await hook.answer(replica(pod))) == [
            f"{image.tag_ref}@{image.digest}"
        ]
    moved = registry.push.move_tag(image)
    clock.now += 61  # the cache entry expires: the next review asks the registry again
    for _ in range(3):
        assert patched_images(await hook.answer(replica(pod))) == [
            f"{moved.tag_ref}@{moved.digest}"
        ]


async def test_an_answer_follows_a_decision_made_anew_for_another_with_its_images(
    registry: RegistryEnv, stack: AsyncExitStack
) -> None:
    """Two templates with the same images share one plan and its decision. When one of them
    finds the tag moved, the other's next review is answered with the new decision (and
    recalled with it from then on), not with the answer rendered for the old one."""
    clock = Clock()
    image = registry.push.image("answers/shared", "stable")
    hook = await webhook(stack, registry.host, clock)
    first, second = plain_pod(image.tag_ref, name=""), plain_pod(image.tag_ref, name="")
    first["metadata"]["labels"] = {"app": "first"}
    second["metadata"]["labels"] = {"app": "second"}
    pinned = f"{image.tag_ref}@{image.digest}"
    for pod in (first, second, first, second, first, second, second):
        assert patched_images(await hook.answer(replica(pod))) == [pinned]
    moved = registry.push.move_tag(image)
    clock.now += 61
    for _ in range(3):
        assert patched_images(await hook.answer(replica(first))) == [
            f"{moved.tag_ref}@{moved.digest}"
        ]
    recalled = hook.recalled()
    for _ in range(3):
        assert patched_images(await hook.answer(replica(second))) == [
            f"{moved.tag_ref}@{moved.digest}"
        ]
    assert hook.recalled() == recalled + 2


async def test_a_new_configuration_starts_afresh(
    registry: RegistryEnv, stack: AsyncExitStack
) -> None:
    image = registry.push.image("answers/conf", "v1")
    clock = Clock()
    hook = await webhook(stack, registry.host, clock)
    pod = plain_pod(image.tag_ref, name="")
    for _ in range(3):
        assert patched_images(await hook.answer(replica(pod))) != []
    hook.mutator = await registry_mutator(stack, registry.host, clock, "kinds:\n  pods: off\n")
    assert "patch" not in await hook.answer(replica(pod))


async def test_an_alike_review_is_checked_for_its_uid(
    registry: RegistryEnv, stack: AsyncExitStack
) -> None:
    image = registry.push.image("answers/uid", "v1")
    hook = await webhook(stack, registry.host, Clock())
    doc = replica(plain_pod(image.tag_ref, name=""))
    for _ in range(3):
        doc["request"]["uid"] = str(uuid.uuid4())
        await hook.answer(doc)
    for uid in ("", 7, None):
        doc["request"]["uid"] = uid
        reply = await hook.post(orjson.dumps(doc))
        assert reply.status_code == 400 and "request.uid" in reply.json()["error"]


async def test_a_uid_before_the_requests_is_never_cut_out_for_it(
    registry: RegistryEnv, stack: AsyncExitStack
) -> None:
    """The body is cut at its first uid; when that is another's (here a user's, written
    before the request's), nothing is kept under that cut, and each review is read whole."""
    image = registry.push.image("answers/order", "v1")
    hook = await webhook(stack, registry.host, Clock())
    doc = replica(plain_pod(image.tag_ref, name=""))
    request = doc["request"]
    user = {"username": "u", "uid": "same-user"}
    for _ in range(3):
        request["uid"] = str(uuid.uuid4())
        doc["request"] = {"userInfo": user, **{k: v for k, v in request.items() if k != "userInfo"}}
        answer = await hook.answer(doc)  # checks the uid it echoes
        assert patched_images(answer) == [f"{image.tag_ref}@{image.digest}"]
    assert hook.recalled() == 0
    # The user's uid changes and the request's stays: still answered for the request's.
    user["uid"] = "other-user"
    assert (await hook.answer(doc))["uid"] == doc["request"]["uid"]


def test_the_uid_stand_in_is_not_known_outside_the_process() -> None:
    """A body holding the stand-in the cut is checked with (even JSON-escaped) would pass a
    user's uid for the request's: no client can know it."""
    show = "from webhook.answers import _UID_STAND_IN_TEXT as s; print(s)"
    seen = {
        subprocess.run(
            [sys.executable, "-c", show], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    }
    assert len(seen) == 2


@pytest.mark.parametrize("uid", ["a b", "a\\u0062", "\u00e9t\u00e9", "x" * 129])
async def test_a_uid_that_is_not_plain_is_answered_but_never_recalled(
    registry: RegistryEnv, stack: AsyncExitStack, uid: str
) -> None:
    image = registry.push.image("answers/plain", "v1")
    hook = await webhook(stack, registry.host, Clock())
    pod = plain_pod(image.tag_ref, name="")
    for n in range(3):
        doc = replica(pod)
        doc["request"]["uid"] = f"{uid}{n}"
        assert (await hook.answer(doc))["uid"] == f"{uid}{n}"
    assert hook.recalled() == 0


async def test_only_the_same_bytes_share_an_answer(
    registry: RegistryEnv, stack: AsyncExitStack
) -> None:
    """Bodies that decode alike but are written differently are read each on its own."""
    image = registry.push.image("answers/bytes", "v1")
    hook = await webhook(stack, registry.host, Clock())
    doc = replica(plain_pod(image.tag_ref, name=""))
    for _ in range(2):
        await hook.answer(doc)
    recalled = hook.recalled()
    spaced = orjson.dumps(doc, option=orjson.OPT_INDENT_2)
    reply = await hook.post(spaced)
    assert reply.status_code == 200 and reply.json()["response"]["uid"] == doc["request"]["uid"]
    assert hook.recalled() == recalled
    reply = await hook.post(spaced.replace(doc["request"]["uid"].encode(), b"fresh-uid", 1))
    assert reply.json()["response"]["uid"] == "fresh-uid"


async def test_a_body_that_is_not_json_is_refused_with_its_own_offsets(
    registry: RegistryEnv, stack: AsyncExitStack
) -> None:
    hook = await webhook(stack, registry.host, Clock())
    body = orjson.dumps(replica(plain_pod("nginx:1", name="")))[:-1]
    reply = await hook.post(body)
    assert reply.status_code == 400
    assert reply.json()["error"] == f"body is not JSON: {_json_error(body)}"


def _json_error(body: bytes) -> str:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return str(exc)
    raise AssertionError("valid JSON")


async def test_updates_are_not_kept(registry: RegistryEnv, stack: AsyncExitStack) -> None:
    image = registry.push.image("answers/update", "v1")
    hook = await webhook(stack, registry.host, Clock())
    pod = plain_pod(image.tag_ref, name="web")
    for _ in range(3):
        doc = review(copy.deepcopy(pod), namespace="web", operation="UPDATE", old=plain_pod("x"))
        assert patched_images(await hook.answer(doc)) == [f"{image.tag_ref}@{image.digest}"]
    assert hook.recalled() == 0


COUNTS = Metrics().admission_counts("Pod", "CREATE", "patched")


def _request() -> AdmissionRequest:
    return AdmissionRequest("admission.k8s.io/v1", "u", "", "Pod", "CREATE", "ns", {}, None)


def _line(fields: dict[str, object] | None = None) -> Line:
    return Line(logging.getLogger("webhook.app"), "admission patched", fields or {}, ())


def _plan() -> RequestPlan:
    return RequestPlan(Mode.PIN, load_settings("").policy_for(None))


def test_an_answer_is_kept_from_the_second_review_of_its_key_on() -> None:
    """Most reviews have none like them: keeping theirs cost them time for nothing, and
    emptied the answers that are recalled every ``ANSWERS_SIZE`` of them."""
    mutator = Mutator(load_settings(""), None, Metrics())  # type: ignore[arg-type]
    answers = Answers(mutator)
    assert [answers.seen_again(b"k") for _ in range(3)] == [False, True, True]
    assert not any(answers.seen_again(b"unlike-%d" % n) for n in range(3 * SEEN_SIZE))
    assert answers.seen_again(b"unlike-%d" % (3 * SEEN_SIZE - 1))
    # Past SEEN_SIZE the keys seen once are forgotten: seen again, each is new again.
    assert not answers.seen_again(b"unlike-0")


def test_answers_forget_everything_past_their_size_or_bytes() -> None:
    mutator = Mutator(load_settings(""), None, Metrics())  # type: ignore[arg-type]
    answers = Answers(mutator, size=2, max_bytes=10_000)
    for key in (b"a", b"b"):
        answers.keep(key, _request(), _plan())
    answers.keep(b"c", _request(), _plan())
    assert (answers.get(b"a"), answers.get(b"b")) == (None, None) and len(answers) == 1
    answers.keep(b"x" * 9_000, _request(), _plan())
    answers.keep(b"y" * 2_000, _request(), _plan())  # 11,000 bytes of keys: all go first
    assert len(answers) == 1 and answers.get(b"y" * 2_000) is not None


def test_a_kept_review_holds_no_object() -> None:
    mutator = Mutator(load_settings(""), None, Metrics())  # type: ignore[arg-type]
    answers = Answers(mutator)
    request = _request()._replace(obj={"spec": "x" * 100_000}, old_obj={"big": True})
    answer = answers.keep(b"k", request, _plan())
    assert answer.review.obj is None and answer.review.old_obj is None
    assert answer.request("new").uid == "new"


def test_a_rendered_answer_counts_against_the_bytes() -> None:
    mutator = Mutator(load_settings(""), None, Metrics())  # type: ignore[arg-type]
    answers = Answers(mutator, max_bytes=1000)
    other = answers.keep(b"other", _request(), _plan())
    decision = Decision(mutator.failed(_request()).outcome, {}, {})
    decision.outcome.warnings.append("w" * 500)
    assert answers.settle(other, decision, _line(), COUNTS)
    answer = answers.keep(b"k", _request(), _plan())
    # No room for a second answer of 500 characters: the other one goes to make it.
    line = _line({"images": ["i" * 100]})
    assert answers.settle(answer, decision, line, COUNTS)
    assert answers.get(b"other") is None and answers.get(b"k") is answer
    # One that could never fit is not kept rendered.
    decision.outcome.warnings.append("w" * 1000)
    assert not answers.settle(answer, decision, _line(), COUNTS)
    assert answer.log_line is line


def test_an_answer_holding_the_uids_stand_in_is_rendered_whole_every_time() -> None:
    """The answer is rendered once with a stand-in for the uid and cut there; an answer whose
    own text holds the stand-in cannot be cut, and is never kept."""
    mutator = Mutator(load_settings(""), None, Metrics())  # type: ignore[arg-type]
    answers = Answers(mutator)
    answer = answers.keep(b"k", _request(), _plan())
    decision = Decision(mutator.failed(_request()).outcome, {}, {})
    decision.outcome.warnings.append("\x00pinhook-uid\x00")
    assert not answers.settle(answer, decision, _line(), COUNTS)
    decision.outcome.warnings[-1] = "pinhook-uid"
    assert answers.settle(answer, decision, _line(), COUNTS)
    assert orjson.loads(answer.response('a"b'))["response"]["uid"] == 'a"b'


@pytest.mark.parametrize(
    ("uid", "plain"),
    [
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ("aZ09-._:", True),
        ("a/b", False),
        ("a\\\\b", False),
        ("\u00e9", False),
    ],
)
def test_a_uid_is_cut_out_when_plain_letters_digits_and_dashes_dots_underscores_colons(
    uid: str, plain: bool
) -> None:
    body = b'{"request":{"uid":"' + uid.encode() + b'","kind":{}}}'
    like = like_review(body)
    assert (like is not None) == plain
    if like is not None:
        assert (like.uid, like.key, like.at) == (uid, b'{"request":{"uid":"","kind":{}}}', 19)
