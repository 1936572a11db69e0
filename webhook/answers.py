"""Reviews that differ only in their uid, answered again without reading them again.

The API server sends the Pods of one ReplicaSet's scale-up as reviews that are the same but for
the request's uid: one controller creates them from one template, under one service account,
in one burst; they have no name yet (``generateName``) and their managed fields carry the same
second. For such a review, pinhook skips what it did for the first ones:

* decoding the body, checking the envelope, finding the image fields and planning them (the
  plan is kept);
* while the decision stands (``recall.py``: the cache still holds the same digests, and so the
  very same ``Decision`` comes back), rendering the answer and the admission log line.

What still runs for every review: the check that the cache entries the decision rests on are
still held (``Mutator.standing``), its counts, and its uid and duration in the log line (one
line for the like reviews answered within the log's hold, ``logs.Line``).
A decision that does not stand (a digest moved or expired) is made and rendered afresh, as for
any review.

An answer is kept from the second review of its key on (``SEEN_SIZE``): most reviews have none
like them (a Pod of no ReplicaSet, a KServe or Knative object), and keeping theirs cost each
one its answer's cut and its line's size (about a tenth of such a review's time) for nothing,
and pushed the answers that are recalled out of ``ANSWERS_SIZE``.

The key is the body's bytes with the request's uid cut out (``like_review``): two reviews share
an answer only if they are the same bytes but for that uid, a plain one, so they decode to the
same values but for it. Only CREATE is kept (as in ``recall.py``). One ``Answers`` serves one
``Mutator``, so a new configuration starts afresh."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import orjson

from .admission import AdmissionRequest, render_response
from .decide import Decision
from .logs import Line
from .metrics import Counts
from .mutate import Mutator
from .plan import RequestPlan

# Reviews remembered, and the text of their keys, answers and log lines; past either, all
# are forgotten at once. A scale-up needs one entry per template and second, and an entry only
# pays while its Pods are being created: a few hundred cover many scale-ups at once, in about
# 5 MiB of resident memory.
ANSWERS_SIZE: Final = 256
ANSWERS_BYTES: Final = 1024 * 1024
# Keys seen once and not kept yet, remembered by their hash; past this many, all are forgotten
# at once (a hash that two keys share only keeps an answer a review early).
SEEN_SIZE: Final = 1024
# A review body longer than this is read afresh every time (a Pod's is a few KiB).
ANSWER_BODY_BYTES: Final = 32 * 1024
# Rendered in place of the uid, then cut out: what comes before and after it in the answer.
_UID_MARK: Final = "\x00pinhook-uid\x00"
_UID_MARK_JSON: Final = orjson.dumps(_UID_MARK)
# Where a review body's uid is, and what a uid must be to be cut out of it. The API server
# writes the request's uid first (AdmissionRequest's first field), but any body may hold
# other uids (userInfo.uid), before it or not: ``decoded_like`` tells which one was cut.
_UID_FIELD: Final = b'"uid":"'
_PLAIN_UID_CHARACTERS: Final = b"-.0123456789:ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
_PLAIN_UID_LENGTH: Final = 128
# Unknown outside this process, so that no body can hold it (not even JSON-escaped) and pass
# for the request's uid where another was cut out.
_UID_STAND_IN_TEXT: Final = f"pinhook-{secrets.token_hex(16)}"
_UID_STAND_IN: Final = _UID_STAND_IN_TEXT.encode()


class LikeReview(NamedTuple):
    """A review body cut around its uid: what like reviews share, and what each has alone."""

    key: bytes  # the body without its uid
    uid: str
    at: int  # where the uid was cut out


def like_review(body: bytes) -> LikeReview | None:
    """``body`` cut around the first uid in it, or None when it has none, the uid is not
    plain (letters, digits, ``-._:``; an API server's are UUIDs) or the body is not kept.

    Whether that uid is the request's is for ``decoded_like`` to tell, before an answer is
    kept under the key: then any body with that key is that review but for its request's uid.
    """
    if len(body) > ANSWER_BODY_BYTES:
        return None
    at = body.find(_UID_FIELD)
    if at < 0:
        return None
    at += len(_UID_FIELD)
    end = body.find(b'"', at)
    if end <= at or end - at > _PLAIN_UID_LENGTH:
        return None
    uid = body[at:end]
    if uid.translate(None, _PLAIN_UID_CHARACTERS):  # what is left is not plain
        return None
    # A NamedTuple's own constructor is twice this, on every review (its ``_make`` does so).
    return tuple.__new__(LikeReview, (body[:at] + body[end:], uid.decode(), at))


def decoded_like(like: LikeReview) -> Any | None:
    """The body ``like`` was cut from, decoded, when its cut was at the request's uid; else
    None (then the body is decoded as any other, and no answer is kept for it).

    It is decoded with a stand-in where the uid was: the request's uid is the stand-in
    exactly when the cut was there. The uid is put back before anything reads it.
    """
    try:
        decoded = orjson.loads(like.key[: like.at] + _UID_STAND_IN + like.key[like.at :])
    except orjson.JSONDecodeError:
        return None
    request = decoded.get("request") if isinstance(decoded, dict) else None
    if not isinstance(request, dict) or request.get("uid") != _UID_STAND_IN_TEXT:
        return None
    request["uid"] = like.uid
    return decoded


@dataclass(slots=True)
class Answer:
    """The plan of one review, and what was answered and logged for its last decision."""

    key: bytes
    review: AdmissionRequest  # without its uid and objects: read for the log and a failure
    plan: RequestPlan
    decision: Decision | None = None
    before_uid: bytes = b""
    after_uid: bytes = b""
    log_line: Line | None = None
    counts: Counts | None = None  # what answering a like review again adds to the metrics
    # ``counts`` with a standing decision's own (``with_settled``), and the latter.
    _with_settled: tuple[Counts, Counts] | None = None

    def request(self, uid: str) -> AdmissionRequest:
        return self.review._replace(uid=uid)

    def response(self, uid: str) -> bytes:
        return b"".join((self.before_uid, orjson.dumps(uid), self.after_uid))  # one copy

    def with_settled(self, settled: Counts) -> Counts:
        """What this answer, recalled, adds to the metrics with what the decision standing
        for it adds (``Mutator.standing``): one set to count, worked out once for each."""
        kept = self._with_settled
        if kept is not None and kept[0] is settled:
            return kept[1]
        own = self.counts.adds if self.counts is not None else ()
        both = Counts.of((*own, *settled.adds))
        self._with_settled = (settled, both)
        return both


class Answers:
    def __init__(
        self, mutator: Mutator, size: int = ANSWERS_SIZE, max_bytes: int = ANSWERS_BYTES
    ) -> None:
        self.mutator = mutator
        self._size = size
        self._max_bytes = max_bytes
        self._bytes = 0
        self._answers: dict[bytes, Answer] = {}
        self._seen: set[int] = set()  # hashes of the keys seen once (SEEN_SIZE)

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: bytes) -> Answer | None:
        return self._answers.get(key)

    def seen_again(self, key: bytes) -> bool:
        """Note a review with ``key``; whether one came before it (then its answer is worth
        keeping, see above)."""
        seen = hash(key)  # already worked out: ``get`` looked the key up
        if seen in self._seen:
            return True
        if len(self._seen) >= SEEN_SIZE:
            self._seen.clear()
        self._seen.add(seen)
        return False

    def keep(self, key: bytes, request: AdmissionRequest, plan: RequestPlan) -> Answer:
        if len(self._answers) >= self._size or self._bytes + len(key) > self._max_bytes:
            self._answers.clear()
            self._bytes = 0
        review = request._replace(uid="", obj=None, old_obj=None)
        answer = self._answers[key] = Answer(key, review, plan)
        self._bytes += len(key)
        return answer

    def settle(self, answer: Answer, decision: Decision, log_line: Line, counts: Counts) -> bool:
        """Render ``decision`` once for ``answer``'s like reviews, which each add ``counts``
        to the metrics; False when it cannot be (the uid's stand-in shows up in the answer's
        own text, or the answer alone is over the bytes), and every one is rendered."""
        review = answer.review
        parts = render_response(review.api_version, _UID_MARK, decision.outcome).split(
            _UID_MARK_JSON
        )
        if len(parts) != 2:
            return False
        size = len(answer.key) + sum(map(len, parts)) + log_line.size
        if size > self._max_bytes:
            return False
        if self._answers.get(answer.key) is answer:  # not forgotten while it was decided
            self._bytes += size - _size(answer)
            if self._bytes > self._max_bytes:  # room for this one, the latest: the others go
                self._answers = {answer.key: answer}
                self._bytes = size
        answer.decision = decision
        answer.before_uid, answer.after_uid = parts
        answer.log_line = log_line
        answer.counts = counts
        answer._with_settled = None
        return True


def _size(answer: Answer) -> int:
    """What ``answer`` counts against ``ANSWERS_BYTES``."""
    line = answer.log_line.size if answer.log_line is not None else 0
    return len(answer.key) + len(answer.before_uid) + len(answer.after_uid) + line
