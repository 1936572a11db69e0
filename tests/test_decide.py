"""The pure steps of the pipeline: ``render`` builds every final image string, ``decide`` owns
every deny rule. Results are built by hand here; test_mutate drives the same through HTTP."""

from __future__ import annotations

import pytest

from webhook.config import FailurePolicy, LimitSettings, OnFailure, OutputForm, load_settings
from webhook.decide import decide
from webhook.errors import InvalidReference, NotFound
from webhook.kinds import Mode
from webhook.locate import NO_PULL, ImageField
from webhook.oci.reference import ImageRef
from webhook.plan import ImagePlan, ImageResult, InvalidImage, RequestPlan, plan_image, render

DIGEST = "sha256:" + "d" * 64
OLD = "sha256:" + "0" * 64
REWRITES = load_settings("").rewrite_map  # the built-in kube-rbac-proxy rule
SKIP = frozenset({"kind.local"})
TAG = OutputForm.TAG_AND_DIGEST


def plan(image: str, index: int = 0, mode: Mode = Mode.PIN) -> ImagePlan:
    field = ImageField(f"/spec/containers/{index}/image", image, NO_PULL)
    return plan_image(field, ImageRef.parse(image), REWRITES, SKIP, mode)


@pytest.mark.parametrize(
    ("image", "digest", "output", "final"),
    [
        (f"nginx:1.27@{DIGEST}", None, OutputForm.TAG_AND_DIGEST, f"nginx:1.27@{DIGEST}"),
        ("nginx:1.27", DIGEST, OutputForm.TAG_AND_DIGEST, f"nginx:1.27@{DIGEST}"),
        ("nginx:1.27", DIGEST, OutputForm.DIGEST_ONLY, f"nginx@{DIGEST}"),
        (
            "docker.io/library/nginx",
            DIGEST,
            OutputForm.TAG_AND_DIGEST,
            f"docker.io/library/nginx@{DIGEST}",
        ),
        ("kind.local/app:dev", None, OutputForm.TAG_AND_DIGEST, "kind.local/app:dev"),
        # Resolving failed: rewritten only; a digest moved by a rule is dropped, the tag stays.
        ("nginx:1.27", None, OutputForm.TAG_AND_DIGEST, "nginx:1.27"),
        (
            f"gcr.io/kubebuilder/kube-rbac-proxy:v0.13.1@{OLD}",
            None,
            OutputForm.TAG_AND_DIGEST,
            "quay.io/brancz/kube-rbac-proxy:v0.13.1",
        ),
        # A digest-only reference whose digest cannot be shown to exist where it goes: as is.
        (
            f"gcr.io/kubebuilder/kube-rbac-proxy@{OLD}",
            None,
            OutputForm.TAG_AND_DIGEST,
            f"gcr.io/kubebuilder/kube-rbac-proxy@{OLD}",
        ),
    ],
)
def test_render(image: str, digest: str | None, output: OutputForm, final: str) -> None:
    assert render(plan(image), digest, output) == final


def result(image: str, index: int = 0, *, failed: bool = False) -> ImageResult:
    planned = plan(image, index)
    digest = None if failed else DIGEST
    failure = NotFound(f"{image}: not found") if failed else None
    return ImageResult(
        planned, render(planned, digest, OutputForm.TAG_AND_DIGEST), digest, None, failure
    )


def request(*images: ImagePlan | InvalidImage, policy: FailurePolicy | None = None) -> RequestPlan:
    return RequestPlan(
        Mode.PIN, policy or FailurePolicy(), "default", images, warnings=("pinhook: located",)
    )


def invalid(image: str, index: int) -> InvalidImage:
    field = ImageField(f"/spec/containers/{index}/image", image, NO_PULL)
    return InvalidImage(field, InvalidReference(f"invalid reference {image!r}"))


REQUIRE = FailurePolicy(require_digest=True)
DENY = FailurePolicy(on_failure=OnFailure.DENY)


def test_admitted_with_patch_warnings_in_order_and_a_full_tally() -> None:
    results = [result("nginx:1.27", 0), result("example.com/app:1", 2, failed=True)]
    plan_ = request(results[0].plan, invalid("Bad:1", 1), results[1].plan)
    decision = decide(plan_, results)
    outcome = decision.outcome
    assert outcome.allowed
    assert outcome.patch == [
        {"op": "replace", "path": "/spec/containers/0/image", "value": f"nginx:1.27@{DIGEST}"}
    ]
    assert outcome.warnings[:2] == [
        "pinhook: located",
        "pinhook: /spec/containers/1/image: invalid reference 'Bad:1'; left as is",
    ]
    assert "example.com/app:1 not pinned" in outcome.warnings[2]
    assert outcome.audit["unpinned"] == '["example.com/app:1 (not-found)"]'
    assert decision.images == {"invalid": 1, "pinned": 1, "unpinned": 1}
    assert decision.failures == {"not-found": 1}


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (REQUIRE, "pinhook: /spec/containers/1/image: invalid reference 'Bad:1'"),
        (DENY, "pinhook: cannot pin example.com/app:1 (/spec/containers/2/image):"),
    ],
)
def test_every_deny_rule_still_counts_every_image(policy: FailurePolicy, message: str) -> None:
    results = [result("nginx:1.27", 0), result("example.com/app:1", 2, failed=True)]
    plan_ = request(results[0].plan, invalid("Bad:1", 1), results[1].plan, policy=policy)
    decision = decide(plan_, results)
    assert not decision.outcome.allowed
    assert decision.outcome.code == 403
    assert (decision.outcome.message or "").startswith(message)
    assert decision.outcome.patch == [] and decision.outcome.warnings == []
    assert decision.images == {"invalid": 1, "pinned": 1, "unpinned": 1}


def test_require_digest_denies_the_first_image_left_without_one() -> None:
    results = [result("example.com/app:1", 0, failed=True), result("kind.local/app:dev", 1)]
    decision = decide(request(*(r.plan for r in results), policy=REQUIRE), results)
    assert decision.outcome.message == (
        "pinhook: kind.local/app:dev (/spec/containers/1/image) would not be pinned to a digest"
        " and requireDigest is set"
    )
    only_failed = results[:1]
    decision = decide(request(only_failed[0].plan, policy=REQUIRE), only_failed)
    assert decision.outcome.message == (
        "pinhook: cannot pin example.com/app:1 (not-found) and requireDigest is set"
    )


def test_require_digest_applies_to_pinned_kinds_only() -> None:
    results = [result("kind.local/app:dev")]
    rewrite_only = RequestPlan(Mode.REWRITE, REQUIRE, None, (results[0].plan, invalid("Bad:1", 1)))
    assert decide(rewrite_only, results).outcome.allowed


@pytest.mark.parametrize(
    ("policy", "mode", "allowed"),
    [
        (FailurePolicy(), Mode.PIN, True),
        (REQUIRE, Mode.PIN, False),
        (DENY, Mode.PIN, False),
        (REQUIRE, Mode.REWRITE, True),
        (DENY, Mode.OFF, True),
    ],
)
def test_a_timeout_follows_the_failure_policy(
    policy: FailurePolicy, mode: Mode, allowed: bool
) -> None:
    decision = decide(RequestPlan(mode, policy), None)
    assert decision.outcome.allowed is allowed
    if allowed:
        assert decision.outcome.warnings == ["pinhook: timed out; object left as is"]
    else:
        assert decision.outcome.message == "pinhook: timed out resolving images"
    assert decision.images == {} and decision.failures == {}


# --- audit mode -----------------------------------------------------------------------------


def audited(*images: ImagePlan | InvalidImage, policy: FailurePolicy | None = None) -> RequestPlan:
    return RequestPlan(Mode.AUDIT, policy or FailurePolicy(), "default", images)


def test_audit_reports_what_pin_would_patch_and_patches_nothing() -> None:
    results = [result("nginx:1.27", 0), result("example.com/app:1", 1, failed=True)]
    decision = decide(audited(*(r.plan for r in results)), results)
    outcome = decision.outcome
    assert outcome.allowed and outcome.patch == []
    assert decision.result == "audited"
    assert outcome.audit["would-patch"] == f'["nginx:1.27 -> nginx:1.27@{DIGEST}"]'
    assert "images" not in outcome.audit and "would-deny" not in outcome.audit
    assert outcome.audit["unpinned"] == '["example.com/app:1 (not-found)"]'
    assert outcome.warnings[0] == (
        f"pinhook (audit mode): would change nginx:1.27 -> nginx:1.27@{DIGEST}"
    )
    assert "example.com/app:1 not pinned" in outcome.warnings[1]
    # Counted as audited, not pinned: nothing was.
    assert decision.images == {"audited": 1, "unpinned": 1}
    assert decision.results == results


@pytest.mark.parametrize("policy", [REQUIRE, DENY])
def test_audit_never_denies_and_says_what_pin_would_deny(policy: FailurePolicy) -> None:
    results = [result("example.com/app:1", 0, failed=True)]
    pinned = decide(RequestPlan(Mode.PIN, policy, "default", (results[0].plan,)), results)
    assert not pinned.outcome.allowed and pinned.result == "denied"
    decision = decide(audited(results[0].plan, policy=policy), results)
    assert decision.outcome.allowed and decision.result == "audited"
    assert decision.outcome.audit["would-deny"] == (pinned.outcome.message or "").removeprefix(
        "pinhook: "
    )
    assert decision.outcome.warnings[0].startswith("pinhook (audit mode): would deny: ")


def test_audit_of_a_timeout_is_admitted_with_what_pin_would_do() -> None:
    decision = decide(RequestPlan(Mode.AUDIT, REQUIRE), None)
    assert decision.outcome.allowed and decision.result == "audited"
    assert decision.outcome.audit["would-deny"] == "timed out resolving images"


# --- what one answer may say -----------------------------------------------------------------


def parsed_invalid(image: str, index: int = 0) -> InvalidImage:
    """An invalid image with the error the parser really gives for it."""
    field = ImageField(f"/spec/containers/{index}/image", image, NO_PULL)
    with pytest.raises(InvalidReference) as error:
        ImageRef.parse(image)
    return InvalidImage(field, error.value)


@pytest.mark.parametrize("mode", [Mode.PIN, Mode.AUDIT])
def test_a_huge_invalid_image_gets_a_bounded_answer(mode: Mode) -> None:
    huge = "Nginx:" + "x" * 200_000
    plan_ = RequestPlan(mode, REQUIRE, "default", (parsed_invalid(huge),))
    outcome = decide(plan_, []).outcome
    said = [outcome.message or "", *outcome.warnings, *outcome.audit.values()]
    assert sum(len(text) for text in said) < 2_000
    # The denial quotes the image as the parser's error does: its start, cut short.
    expected = "/spec/containers/0/image: invalid reference 'Nginx:xxx"
    if mode is Mode.PIN:
        assert not outcome.allowed
        assert (outcome.message or "").startswith(f"pinhook: {expected}")
    else:
        assert outcome.allowed
        assert outcome.audit["would-deny"].startswith(expected)
        assert outcome.warnings[0].startswith(f"pinhook (audit mode): would deny: {expected}")


@pytest.mark.parametrize("mode", [Mode.PIN, Mode.AUDIT])
def test_a_long_denial_is_cut_to_the_annotation_limit(mode: Mode) -> None:
    # Five valid but long names, all failing: the denial names them all.
    images = [f"example.com/{'a' * 120}/{'b' * 120}/app{i}:1" for i in range(5)]
    results = [result(image, i, failed=True) for i, image in enumerate(images)]
    limits = LimitSettings(audit_annotation_bytes=256)
    plan_ = RequestPlan(mode, REQUIRE, "default", tuple(r.plan for r in results), limits=limits)
    outcome = decide(plan_, results).outcome
    if mode is Mode.PIN:
        denial = (outcome.message or "").removeprefix("pinhook: ")
    else:
        denial = outcome.audit["would-deny"]
        assert outcome.warnings[0] == f"pinhook (audit mode): would deny: {denial}"
    assert denial.startswith(f"cannot pin {images[0][:200]}")
    assert len(denial.encode()) <= 256
    assert denial.endswith(" more bytes)")


def test_results_name_what_pinhook_did() -> None:
    pinned = [result("nginx:1.27", 0)]
    assert decide(request(pinned[0].plan), pinned).result == "patched"
    kept = [result(f"nginx:1.27@{DIGEST}", 0)]
    assert decide(request(kept[0].plan), kept).result == "unchanged"
    skipped = RequestPlan(Mode.OFF, FailurePolicy(), skipped="mode off")
    assert decide(skipped, []).result == "skipped"
