"""Reviews that differ only in their uid, answered again without reading them again.

The API server sends the Pods of one ReplicaSet's scale-up as reviews that are the same but for
the request's uid: one controller creates them from one template, under one service account,
in one burst; they have no name yet (``generateName``) and their managed fields carry the same
second. For such a review, pinhook skips what it did for the first one:

* checking the envelope, finding the image fields and planning them (the plan is kept);
* while the decision stands (``recall.py``: the cache still holds the same digests, and so the
  very same ``Decision`` comes back), rendering the answer and the admission log's fields.

What still runs for every review: the cache lookups that tell whether the decision stands
(``Mutator.settled`` and ``conclude``), the metrics and the log line. A decision that does not
stand (a digest moved or expired) is made and rendered afresh, as for any review.

The key is the decoded review encoded again with its uid left out: two reviews share an
answer only if they decode to the same values in the same order, however they were spaced or
escaped. Only CREATE is kept (as in ``recall.py``). One ``Answers`` serves one ``Mutator``,
so a new configuration starts afresh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import orjson

from .admission import AdmissionRequest, render_response
from .decide import Decision
from .mutate import Mutator
from .plan import RequestPlan

# Reviews remembered, and the text of their keys, answers and log fields; past either, all
# are forgotten at once. A scale-up needs one entry per template and second, and an entry only
# pays while its Pods are being created: a few hundred cover many scale-ups at once, in about
# 5 MiB of resident memory.
ANSWERS_SIZE: Final = 256
ANSWERS_BYTES: Final = 1024 * 1024
# A review body longer than this is read afresh every time (a Pod's is a few KiB).
ANSWER_BODY_BYTES: Final = 32 * 1024
# Rendered in place of the uid, then cut out: what comes before and after it in the answer.
_UID_MARK: Final = "\x00pinhook-uid\x00"
_UID_MARK_JSON: Final = orjson.dumps(_UID_MARK)


class LikeReview(NamedTuple):
    key: bytes  # the review without its uid
    uid: str


def like_review(body: bytes, decoded: Any) -> LikeReview | None:
    """The key of a decoded review body, or None when it has no uid or is not kept."""
    if len(body) > ANSWER_BODY_BYTES or not isinstance(decoded, dict):
        return None
    request = decoded.get("request")
    if not isinstance(request, dict) or request.get("operation") != "CREATE":
        return None
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        return None
    request["uid"] = ""
    try:
        key = orjson.dumps(decoded)
    except orjson.JSONEncodeError:  # nested too deeply for orjson: read afresh
        return None
    finally:
        request["uid"] = uid
    return LikeReview(key, uid)


@dataclass(slots=True)
class Answer:
    """The plan of one review, and what was answered and logged for its last decision."""

    key: bytes
    review: AdmissionRequest  # without its uid and objects: read for the log and a failure
    plan: RequestPlan
    decision: Decision | None = None
    before_uid: bytes = b""
    after_uid: bytes = b""
    log_fields: dict[str, object] | None = None

    def request(self, uid: str) -> AdmissionRequest:
        return self.review._replace(uid=uid)

    def response(self, uid: str) -> bytes:
        return self.before_uid + orjson.dumps(uid) + self.after_uid


class Answers:
    def __init__(
        self, mutator: Mutator, size: int = ANSWERS_SIZE, max_bytes: int = ANSWERS_BYTES
    ) -> None:
        self.mutator = mutator
        self._size = size
        self._max_bytes = max_bytes
        self._bytes = 0
        self._answers: dict[bytes, Answer] = {}

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: bytes) -> Answer | None:
        return self._answers.get(key)

    def keep(self, key: bytes, request: AdmissionRequest, plan: RequestPlan) -> Answer:
        if len(self._answers) >= self._size or self._bytes + len(key) > self._max_bytes:
            self._answers.clear()
            self._bytes = 0
        review = request._replace(uid="", obj=None, old_obj=None)
        answer = self._answers[key] = Answer(key, review, plan)
        self._bytes += len(key)
        return answer

    def settle(self, answer: Answer, decision: Decision, log_fields: dict[str, object]) -> bool:
        """Render ``decision`` once for ``answer``'s like reviews; False when it cannot be (the
        uid's stand-in shows up in the answer's own text, or the answer alone is over the
        bytes), and every one is rendered."""
        review = answer.review
        parts = render_response(review.api_version, _UID_MARK, decision.outcome).split(
            _UID_MARK_JSON
        )
        if len(parts) != 2:
            return False
        size = len(answer.key) + sum(map(len, parts)) + _text(log_fields)
        if size > self._max_bytes:
            return False
        if self._answers.get(answer.key) is answer:  # not forgotten while it was decided
            self._bytes += size - _size(answer)
            if self._bytes > self._max_bytes:  # room for this one, the latest: the others go
                self._answers = {answer.key: answer}
                self._bytes = size
        answer.decision = decision
        answer.before_uid, answer.after_uid = parts
        answer.log_fields = log_fields
        return True


def _size(answer: Answer) -> int:
    """What ``answer`` counts against ``ANSWERS_BYTES``."""
    return (
        len(answer.key) + len(answer.before_uid) + len(answer.after_uid) + _text(answer.log_fields)
    )


def _text(log_fields: dict[str, object] | None) -> int:
    """About the characters of ``log_fields`` (its images are most of it)."""
    if log_fields is None:
        return 0
    total = 0
    for value in log_fields.values():
        if isinstance(value, list):
            total += sum(len(str(item)) for item in value)
        else:
            total += len(str(value))
    return total
