"""The MutatingWebhookConfiguration that registers pinhook, built from the active settings.

Pure: no I/O. There is one webhook per kind, so each kind carries its own ``matchConditions``
(CEL, Kubernetes 1.28+): the API server then skips the call altogether for an object none of
whose images pinhook would change (all pinned to a digest and matching no rewrite rule), which
is most requests in a cluster that pins in git.

The conditions are a conservative filter, never the decision: when in doubt they send the
object, and pinhook itself decides. Two consequences worth knowing:

* They follow the rewrite rules. A self-managed pinhook keeps those of its own configuration
  in step with the live config (``conditionsync``); a configuration applied otherwise (the
  cert-manager component, ``pinhook install``) keeps the ones it was generated with, so a rule
  added to the ConfigMap later reaches only objects that are sent anyway (unpinned images)
  until it is regenerated.
* They never fail (see ``cel``): an image value of the wrong type sends the object (pinhook
  answers with a warning); a wrong-typed parent (``spec: "x"``) does not, since pinhook finds
  no image there either.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Final

from .cel import CelTest, cel_images, cel_list, cel_string
from .config import SKIP_ANNOTATION, Settings
from .errors import ConfigError
from .kinds import KINDS, KSERVE, PINNING, KindInfo, Mode
from .oci.reference import DIGEST_HEX_LENGTHS, DOCKER_HUB, DOCKER_HUB_LEGACY
from .rewrite import NamePattern

FAILURE_POLICIES: Final = ("Ignore", "Fail")
NAMESPACE_NAME_LABEL: Final = "kubernetes.io/metadata.name"
ALWAYS_EXCLUDED: Final = ("kube-system", "pinhook-system")
MAX_MATCH_CONDITIONS: Final = 64  # the API server's limit per webhook
REPLICASET_ANNOTATION: Final = "pinhook.dev/replicasets"

_RE2_SPECIAL: Final = frozenset("\\^$|?*+()[]{}")


def _re2(text: str) -> str:
    """Escape literal text for RE2; a dot as ``[.]`` keeps the CEL string free of backslashes."""
    return "".join("[.]" if ch == "." else f"\\{ch}" if ch in _RE2_SPECIAL else ch for ch in text)


# Both spellings of the Docker Hub registry, which normalise to docker.io.
_HUB_EXPLICIT: Final = f"(?:{_re2(DOCKER_HUB)}|{_re2(DOCKER_HUB_LEGACY)})/"
_HUB_OPTIONAL: Final = f"(?:{_HUB_EXPLICIT})?"
# After a name prefix: the end of the name (a tag, a digest or nothing), or a deeper path.
_NAME_BOUNDARY: Final = "(?:[/:@]|$)"
_TAG_OR_END: Final = "(?:[:@]|$)"
# A valid digest at the end: what pinhook treats as pinned (plan.plan_image: KEEP).
PINNED: Final = (
    "@(?:"
    + "|".join(f"{algorithm}:[0-9a-f]{{{n}}}" for algorithm, n in DIGEST_HEX_LENGTHS.items())
    + ")$"
)


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """Where the API server sends requests: an external URL, or a Service in the cluster."""

    url: str | None = None  # e.g. https://172.18.0.1:8443/mutate (pinhook install)
    # namespace, name, port, path; ignored when url is set
    service: tuple[str, str, int, str] | None = ("pinhook-system", "pinhook", 443, "/mutate")
    ca_bundle: str | None = None  # base64 PEM

    def client_config(self) -> dict[str, Any]:
        config: dict[str, Any]
        if self.url is not None:
            config = {"url": self.url}
        elif self.service is not None:
            namespace, name, port, path = self.service
            config = {"service": {"namespace": namespace, "name": name, "port": port, "path": path}}
        else:
            raise ConfigError("webhook target: give a URL or a Service")
        if self.ca_bundle:
            config["caBundle"] = self.ca_bundle
        return config

    @property
    def namespace(self) -> str | None:
        return self.service[0] if self.url is None and self.service is not None else None


def build_webhook_configuration(
    settings: Settings,
    target: WebhookTarget,
    *,
    name: str = "pinhook",
    failure_policy: str = "Ignore",
    match_conditions: bool = True,
    kinds: Collection[str] | None = None,
) -> dict[str, Any]:
    """The MutatingWebhookConfiguration object: one webhook per kind whose mode is not off
    (only those of ``kinds``, when given: a patch that adds them to another configuration)."""
    if failure_policy not in FAILURE_POLICIES:
        raise ConfigError(
            f"failurePolicy {failure_policy!r}: expected one of {', '.join(FAILURE_POLICIES)}"
        )
    active = [info for info in KINDS if settings.modes_for(info.key) - {Mode.OFF}]
    if kinds is not None:
        off = sorted(set(kinds) - {info.key for info in active})
        if off:
            raise ConfigError(f"{', '.join(off)}: off in this configuration, so no webhook")
        active = [info for info in active if info.key in kinds]
    metadata: dict[str, Any] = {"name": name}
    if any(info.resource == "replicasets" for info in active):
        if not match_conditions:
            raise ConfigError(
                "replicasets.apps needs matchConditions (Kubernetes 1.28+): only they can leave"
                " out ReplicaSets owned by a Deployment, which would otherwise be recreated"
                " forever once pinhook changes their template"
            )
        metadata["annotations"] = {
            REPLICASET_ANNOTATION: (
                "WARNING: replicasets.apps is on. Only ReplicaSets without ownerReferences are"
                " sent to pinhook: mutating one owned by a Deployment makes the Deployment"
                " controller create another, forever."
            )
        }
    selector = _namespace_selector(settings, target)
    webhooks = [
        _webhook(settings, info, target, selector, failure_policy, match_conditions)
        for info in active
    ]
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": metadata,
        "webhooks": webhooks,
    }


def _webhook(
    settings: Settings,
    info: KindInfo,
    target: WebhookTarget,
    selector: dict[str, Any],
    failure_policy: str,
    match_conditions: bool,
) -> dict[str, Any]:
    webhook: dict[str, Any] = {
        "name": info.webhook_name,
        "clientConfig": target.client_config(),
        "rules": _rules(info),
    }
    if match_conditions:
        webhook["matchConditions"] = match_conditions_for(settings, info)
    webhook |= {
        # Dry runs (KServe and Knative reconcilers diff with them) reach only webhooks without
        # side effects; pinhook's registry lookups change nothing in the cluster.
        "sideEffects": "None",
        "admissionReviewVersions": ["v1", "v1beta1"],
        "timeoutSeconds": 10,
        # Other webhooks (KServe's Pod webhook, Istio) may add containers after pinhook ran.
        "reinvocationPolicy": "IfNeeded",
        "matchPolicy": "Equivalent",
        "failurePolicy": failure_policy,
        "namespaceSelector": selector,
    }
    return webhook


def _rules(info: KindInfo) -> list[dict[str, Any]]:
    builtin = info.group in ("", "apps", "batch")
    # A Job's pod template is immutable: re-pinning on UPDATE would refuse unrelated updates.
    operations = ["CREATE"] if info.key == "jobs.batch" else ["CREATE", "UPDATE"]
    rule = {
        "apiGroups": [info.group],
        "apiVersions": ["v1"] if builtin else ["*"],
        "operations": operations,
        "resources": [info.resource],
        # ClusterServingRuntime and ClusterStorageContainer are cluster-scoped.
        "scope": "*" if info.group == KSERVE else "Namespaced",
    }
    rules = [rule]
    if info.key == "pods":
        # `kubectl debug` adds ephemeral containers through this subresource only.
        rules.append(rule | {"operations": ["UPDATE"], "resources": ["pods/ephemeralcontainers"]})
    return rules


def _namespace_selector(settings: Settings, target: WebhookTarget) -> dict[str, Any]:
    # Cluster-scoped objects ignore this. Namespaces are left out by name only: the API server
    # sets the name label, while a label that a namespace's owner may set would be a way around
    # the policy for whoever can label namespaces.
    names = excluded_namespaces(settings, target.namespace)
    return {
        "matchExpressions": [
            {"key": NAMESPACE_NAME_LABEL, "operator": "NotIn", "values": list(names)},
        ]
    }


def excluded_namespaces(settings: Settings, own_namespace: str | None) -> tuple[str, ...]:
    """Namespaces pinhook never acts in. Its own must stay out, or with failurePolicy Fail (or
    the backstop policy) pinhook could not start its Pods while it is down; kube-system
    likewise."""
    names = [*ALWAYS_EXCLUDED, *settings.excluded_namespaces]
    if own_namespace is not None:
        names.append(own_namespace)
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True, slots=True)
class NamespaceSet:
    """Some namespaces: ``names``, or (``complement``) every namespace but ``names``.

    The empty name stands for cluster-scoped objects, whose ``request.namespace`` is empty and
    which pinhook treats under the global policy.
    """

    names: tuple[str, ...]
    complement: bool

    @property
    def empty(self) -> bool:
        return not self.complement and not self.names

    @property
    def everything(self) -> bool:
        return self.complement and not self.names

    def has_request(self) -> str:
        """CEL: the request's namespace is in the set."""
        listed = f"request.namespace in {cel_list(self.names)}"
        return f"!({listed})" if self.complement else listed

    def lacks_request(self) -> str:
        """CEL: the request's namespace is not in the set."""
        listed = f"request.namespace in {cel_list(self.names)}"
        return listed if self.complement else f"!({listed})"


def namespaces_where(
    settings: Settings, holds: Callable[[str | None], bool], never: Iterable[str] = ()
) -> NamespaceSet:
    """The namespaces (and the cluster scope) where ``holds``, ``never`` left out.

    ``holds`` is asked about each namespace the settings name and about None (every other
    namespace, and the cluster scope), which is all the settings can tell apart.
    """
    left_out = tuple(never)
    default = holds(None)
    differ = tuple(
        name for name in settings.namespaces if name not in left_out and holds(name) != default
    )
    if default:
        return NamespaceSet(tuple(dict.fromkeys((*left_out, *differ))), complement=True)
    return NamespaceSet(differ, complement=False)


# --- matchConditions ---------------------------------------------------------------------


def match_conditions_for(settings: Settings, kind: KindInfo) -> list[dict[str, str]]:
    """The CEL conditions that all must hold for an object of ``kind`` to reach pinhook.

    At most three, far below the API server's limit of 64 per webhook.
    """
    conditions = []
    not_skipped = not_skipped_condition(settings)
    if not_skipped is not None:
        conditions.append(not_skipped)
    if kind.resource == "replicasets":
        conditions.append({"name": "not-owned", "expression": _NOT_OWNED})
    # Audit computes what pin would: it is sent what pin would be sent. A kind whose mode
    # differs between namespaces is sent what its most demanding mode needs.
    mode = Mode.PIN if settings.modes_for(kind.key) & PINNING else Mode.REWRITE
    regex = rule_pattern(rule.source for rule in settings.rewrite_map.rules)
    if regex is not None and len(regex) > MAX_RULE_REGEX_LENGTH:
        # Too costly to evaluate for every image of every request: send every object.
        return conditions
    verb = "pin" if mode is Mode.PIN else "rewrite"
    test = image_test(mode, regex)
    # A value that is not a string is sent too, so that pinhook can warn about it.
    expression = cel_images(kind).exists(lambda s: f"type({s}) != string || {test(s)}")
    conditions.append({"name": f"has-image-to-{verb}", "expression": expression})
    return conditions


def not_skipped_condition(settings: Settings) -> dict[str, str] | None:
    """The condition that keeps objects annotated ``pinhook.dev/skip: "true"`` away from
    pinhook where the annotation is honoured; None where it is honoured nowhere.

    Only a filter: without it pinhook is called and honours the annotation itself. It is kept
    where the annotation is honoured so that an opted-out object is admitted even while pinhook
    is down under failurePolicy Fail, and dropped where it is not, or anyone able to annotate
    an object would keep it away from pinhook.
    """
    honoured = namespaces_where(
        settings, lambda namespace: settings.skip_honoured(settings.policy_for(namespace))
    )
    if honoured.empty:
        return None
    if honoured.everything:
        return {"name": "not-skipped", "expression": NOT_SKIPPED}
    return {"name": "not-skipped", "expression": f"{honoured.lacks_request()} ||\n{NOT_SKIPPED}"}


# The API server caps each expression's runtime cost (1,000,000 units); matches() costs about
# len(string)/10 * len(regex)/4, per image. 4 KiB of regex (some hundred rules) keeps a Pod with
# a hundred images under that; beyond it the image condition is left out.
MAX_RULE_REGEX_LENGTH: Final = 4096

NOT_SKIPPED: Final = (
    "!has(object.metadata.annotations) ||\n"
    f"!('{SKIP_ANNOTATION}' in object.metadata.annotations) ||\n"
    f"object.metadata.annotations['{SKIP_ANNOTATION}'] != 'true'"
)
# The Deployment controller finds its ReplicaSet by comparing pod templates: one whose template
# pinhook changed no longer matches, and the controller creates another, which is changed in
# turn, forever. So only stand-alone ReplicaSets are sent.
_NOT_OWNED: Final = (
    "!has(object.metadata.ownerReferences) ||\nsize(object.metadata.ownerReferences) == 0"
)


def image_test(mode: Mode, rules_regex: str | None) -> CelTest:
    """CEL for "pinhook may change this image string": unpinned (pin mode) or a rule matches."""

    def rule_test(s: str) -> str:
        return "false" if rules_regex is None else f"{s}.matches({cel_string(rules_regex)})"

    def pin_test(s: str) -> str:
        unpinned = f"!{s}.matches({cel_string(PINNED)})"
        return unpinned if rules_regex is None else f"({unpinned} || {rule_test(s)})"

    return rule_test if mode is Mode.REWRITE else pin_test


def rule_pattern(sources: Iterable[NamePattern]) -> str | None:
    """An anchored RE2 regex matching every written image string a rule could match.

    A rule matches the normalised name, but CEL sees the string as written, so each prefix is
    expanded into every spelling that normalises to it. Tags of tagged rules are ignored: a
    wider match only sends more objects to pinhook, which decides.
    """
    hosts: dict[str, None] = {}  # complete alternatives
    hub_explicit: dict[str, None] = {}  # after "docker.io/" or "index.docker.io/"
    hub_optional: dict[str, None] = {}  # after an optional one of those
    for source in sources:
        _spell(source.prefix, hosts, hub_explicit, hub_optional)
    alternatives = list(hosts)
    if hub_explicit:
        alternatives.append(_HUB_EXPLICIT + _group(hub_explicit))
    if hub_optional:
        alternatives.append(_HUB_OPTIONAL + _group(hub_optional))
    return "^" + _group(alternatives) if alternatives else None


def _group(alternatives: Iterable[str]) -> str:
    return "(?:" + "|".join(alternatives) + ")"


def _spell(
    prefix: str,
    hosts: dict[str, None],
    hub_explicit: dict[str, None],
    hub_optional: dict[str, None],
) -> None:
    """Add the written spellings of one normalised rule prefix to the three groups."""
    registry, slash, path = prefix.partition("/")
    if not slash and registry == DOCKER_HUB:
        # Anything on Docker Hub: the host written out, a first component that is no host, or
        # a name of one component.
        hub_explicit[""] = None
        hosts["[^/.:]+/"] = hosts["[^/]+$"] = None
    elif not slash:
        hosts[_re2(registry) + "/"] = None
    elif registry != DOCKER_HUB:
        hosts[_re2(prefix) + _NAME_BOUNDARY] = None
    elif path == "library":
        hub_optional["library/"] = hub_optional["[^/]+$"] = None
    elif path.startswith("library/"):
        hub_optional[_re2(path) + _NAME_BOUNDARY] = None
        official = path.removeprefix("library/")
        if "/" not in official:
            # "nginx" and "docker.io/nginx" are docker.io/library/nginx; "nginx/x" is not.
            hub_optional[_re2(official) + _TAG_OR_END] = None
    else:
        first = path.split("/", 1)[0]
        # "my.org/x" written without a host would be read as the registry my.org.
        explicit = "." in first or ":" in first or first == "localhost"
        (hub_explicit if explicit else hub_optional)[_re2(path) + _NAME_BOUNDARY] = None
