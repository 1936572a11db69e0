"""pinhook's settings: one validated object, loaded once from one YAML document and passed in.

The document is the same text a ConfigMap holds under ``config.yaml``. Every field has a safe
default, so an empty document is a working configuration (the built-in rewrite map, pin Pods,
KServe and Knative objects, admit with a warning when a registry fails).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PlainSerializer,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import core_schema

from .configfiles import config_texts, merge_documents, read_yaml, sources
from .errors import ConfigError
from .kinds import DEFAULT_MODES, KIND_KEYS, PINNING, Mode
from .oci.hostguard import parse_ip_literal
from .oci.mirror import Mirror, registry_name
from .oci.reference import ImageRef, is_valid_digest, split_host_port
from .rewrite import DEFAULT_RULES, NamePattern, RewriteMap, RewriteRule

SKIP_ANNOTATION = "pinhook.dev/skip"


class OnFailure(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class SkipAnnotation(StrEnum):
    """Whether an object annotated ``pinhook.dev/skip: "true"`` is left alone.

    Anyone who can create an object can annotate it, so under a digest-only policy the
    annotation would be a way around it: ``auto`` ignores it wherever ``requireDigest``
    applies (globally or in that object's namespace) and honours it elsewhere.
    """

    AUTO = "auto"
    HONOURED = "honoured"
    IGNORED = "ignored"


class OutputForm(StrEnum):
    TAG_AND_DIGEST = "tag-and-digest"
    DIGEST_ONLY = "digest-only"


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        # .inf and .nan are valid YAML floats; as a TTL or a timeout they mean "for ever".
        allow_inf_nan=False,
    )


class RulePattern(str):
    """A rule's ``from`` or ``to`` as written, with the pattern parsed from it, once.

    An invalid one raises InvalidReference, a ValueError: pydantic reports it at the field.
    """

    pattern: NamePattern

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[Any], handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(cls._parse, core_schema.str_schema())

    @classmethod
    def _parse(cls, text: str) -> RulePattern:
        parsed = cls(text)
        parsed.pattern = NamePattern.parse(text)
        return parsed


class RuleSettings(_Model):
    source: RulePattern = Field(alias="from")
    target: RulePattern = Field(alias="to")
    _rule: RewriteRule = PrivateAttr()

    @model_validator(mode="after")
    def _compile(self) -> RuleSettings:
        # An inconsistent pair raises InvalidReference: pydantic reports it at the rule.
        self._rule = RewriteRule(self.source.pattern, self.target.pattern)
        return self

    @property
    def rule(self) -> RewriteRule:
        return self._rule


class FailurePolicy(_Model):
    """What happens to an image that cannot be pinned."""

    on_failure: OnFailure = OnFailure.ALLOW
    require_digest: bool = False


class NamespacePolicy(_Model):
    """Per-namespace overrides of the global failure policy and mode; unset fields inherit."""

    on_failure: OnFailure | None = None
    require_digest: bool | None = None
    # Replaces the mode of every kind that pins (pin or audit) for objects in the namespace.
    mode: Mode | None = None

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return _off(value)


_DAY = 86_400.0
MAX_MIRRORS = 8  # per registry; each one tried costs time before the registry itself


REDIS_SCHEMES = ("redis", "rediss", "unix")
REDIS_PASSWORD_ENV = "PINHOOK_REDIS_PASSWORD"  # noqa: S105 (a variable's name)


class RedisSettings(_Model):
    """The shared digest cache every replica uses as its second level (``sharedcache``).

    Where Redis is: ``url`` in the config (never with a password in it), or ``urlFile``, a
    file mounted from a Secret. The password: ``passwordFile`` (read again on every new
    connection, so a rotated Secret is followed), else the environment variable
    PINHOOK_REDIS_PASSWORD, else none.
    """

    url: str | None = None
    url_file: Path | None = None
    username: str | None = None
    password_file: Path | None = None
    # TLS to Redis: also implied by a rediss:// URL. ``caFile``: the CA that signed its
    # certificate, when it is not in the system's store.
    tls: bool = False
    ca_file: Path | None = None
    key_prefix: str = Field(default="pinhook:", min_length=1, max_length=64)
    # Every Redis operation gives up after this long: Redis is an optimisation, and an
    # admission must never wait on it for long.
    timeout_seconds: float = Field(default=0.1, gt=0, le=5)
    # The fleet-wide lock on one lookup: kept alive while its holder resolves, so a replica
    # that dies holding it delays the others by at most this long.
    lock_seconds: float = Field(default=2.0, ge=0.1, le=60)
    # The circuit breaker: after this many failures in a row, Redis is left alone for
    # ``openSeconds``, then one operation probes it.
    failures_to_open: int = Field(default=3, ge=1, le=1000)
    open_seconds: float = Field(default=10.0, gt=0, le=3600)
    max_connections: int = Field(default=64, ge=2, le=10_000)

    @field_validator("key_prefix")
    @classmethod
    def _plain_prefix(cls, value: str) -> str:
        if any(ch.isspace() for ch in value):
            raise ValueError("must not contain whitespace")
        return value

    @field_validator("url")
    @classmethod
    def _no_password_in_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_redis_url(value, secret=False)
        return value

    @model_validator(mode="after")
    def _one_url(self) -> RedisSettings:
        if (self.url is None) == (self.url_file is None):
            raise ValueError("give exactly one of url and urlFile")
        return self


def check_redis_url(url: str, *, secret: bool) -> None:
    """ValueError unless ``url`` is a Redis URL; one in plain config (not ``secret``) must not
    carry a password. The message never repeats the URL: it may hold one."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in REDIS_SCHEMES:
        raise ValueError(f"must be a {', '.join(s + '://' for s in REDIS_SCHEMES)} URL")
    if parts.scheme.lower() == "unix" and not parts.path:
        raise ValueError("names no socket path")
    if parts.scheme.lower() != "unix" and not parts.hostname:
        raise ValueError("names no host")
    if not secret and (parts.password is not None or "password=" in parts.query.lower()):
        raise ValueError(
            "carries a password: put the password in passwordFile (mounted from a Secret) or"
            f" ${REDIS_PASSWORD_ENV}, or the whole URL in urlFile"
        )


class OwnerPinningSettings(_Model):
    """Pods of one owner (a ReplicaSet, a Job; a StatefulSet's or DaemonSet's revision) get
    the digest the first of them got for a tag, even after the tag moved."""

    enabled: bool = True
    # Longer than any rollout; a Pod of the owner created later resolves afresh.
    ttl_seconds: float = Field(default=_DAY, gt=0, le=30 * _DAY)


class CacheSettings(_Model):
    ttl_seconds: float = Field(default=300.0, gt=0, le=30 * _DAY)
    negative_ttl_seconds: float = Field(default=30.0, ge=0, le=_DAY)
    # Each entry costs a few hundred bytes; the bound keeps the cache inside the Pod's memory.
    max_entries: int = Field(default=10_000, ge=1, le=1_000_000)
    stale_on_error: bool = True
    # How long past its TTL an entry may still be served when the registry is failing.
    stale_max_seconds: float = Field(default=_DAY, ge=0, le=30 * _DAY)
    redis: RedisSettings | None = None
    owner_pinning: OwnerPinningSettings = OwnerPinningSettings()


def _mirror(value: Any) -> Mirror:
    """A mirror as written (``scheme://host[:port]`` or ``host[:port]``), parsed once."""
    if isinstance(value, Mirror):
        return value
    if not isinstance(value, str):
        raise ValueError("a mirror is a string: https://host[:port], http://… or host[:port]")
    return Mirror.parse(value)  # ValueError: reported at the mirror


# Read from and written as its URL (``config_hash`` dumps the settings).
MirrorURL = Annotated[Mirror, PlainValidator(_mirror), PlainSerializer(str, return_type=str)]


class RegistrySettings(_Model):
    timeout_seconds: float = Field(default=8.0, gt=0, le=30)
    insecure: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    max_attempts: int = Field(default=3, ge=1, le=10)
    docker_config: Path | None = None
    skip: tuple[str, ...] = ("kind.local", "ko.local", "dev.local")
    # Lookups at once: in all, and to one registry host.
    concurrency: int = Field(default=64, ge=1, le=1024)
    concurrency_per_registry: int = Field(default=16, ge=1, le=1024)

    # The kubelet's --image-credential-provider-config and --image-credential-provider-bin-dir.
    image_credential_provider_config: Path | None = None
    image_credential_provider_bin_dir: Path | None = None
    # How long a credential provider or docker credential helper may run. A request waits at
    # most its own deadline; a slower answer is still cached for the requests that follow.
    credential_exec_timeout_seconds: float = Field(default=30.0, gt=0, le=60)
    # Registry (normalised: docker.io for index.docker.io) -> pull-through caches asked first,
    # in order, to resolve its tags.
    mirrors: dict[str, tuple[MirrorURL, ...]] = Field(default_factory=dict)

    @field_validator("mirrors")
    @classmethod
    def _mirror_lists(cls, value: dict[str, tuple[Mirror, ...]]) -> dict[str, tuple[Mirror, ...]]:
        lists: dict[str, tuple[Mirror, ...]] = {}
        for registry, mirrors in value.items():
            name = registry_name(registry)
            if name in lists:
                raise ValueError(f"{registry!r}: the mirrors of {name} are given twice")
            if len(mirrors) > MAX_MIRRORS:
                raise ValueError(f"{registry!r}: at most {MAX_MIRRORS} mirrors")
            lists[name] = mirrors
        return lists

    @model_validator(mode="after")
    def _plain_http_mirrors_are_insecure(self) -> RegistrySettings:
        insecure = {host.strip().lower() for host in self.insecure}
        for mirrors in self.mirrors.values():
            for mirror in mirrors:
                if mirror.scheme == "http" and mirror.host not in insecure:
                    raise ValueError(
                        f"mirrors: {mirror} is plain HTTP:"
                        f" list {mirror.host} in registry.insecure too"
                    )
        return self

    @model_validator(mode="after")
    def _provider_paths(self) -> RegistrySettings:
        config, bin_dir = (
            self.image_credential_provider_config,
            self.image_credential_provider_bin_dir,
        )
        if (config is None) != (bin_dir is None):
            raise ValueError(
                "imageCredentialProviderConfig and imageCredentialProviderBinDir go together"
            )
        return self


class ServerSettings(_Model):
    """The webhook's own connections: slow, silent or too many clients are cut off."""

    handshake_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    request_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    # Longer than the 90 s Go's HTTP client (the API server's) keeps an idle connection, so
    # pinhook never closes one the client is about to reuse.
    idle_timeout_seconds: float = Field(default=120.0, gt=0, le=3600)
    # Each open TLS connection holds a 256 KiB buffer: this bounds that memory.
    max_connections: int = Field(default=256, ge=1, le=65_536)


class LimitSettings(_Model):
    """What one object may ask of pinhook; beyond, the images are left to the policy."""

    images_per_object: int = Field(default=1000, ge=1, le=100_000)
    lookups_per_object: int = Field(default=64, ge=1, le=10_000)  # distinct new tags
    warnings_per_response: int = Field(default=20, ge=1, le=1000)
    audit_annotation_bytes: int = Field(default=4096, ge=256, le=65_536)


# pinhook's own rules: kept whatever `rewrites` says, unless `builtinRewrites: false`.
BUILTIN_RULES: tuple[RewriteRule, ...] = tuple(
    RewriteRule(NamePattern.parse(source), NamePattern.parse(target))
    for source, target in DEFAULT_RULES
)


class Settings(_Model):
    rewrites: tuple[RuleSettings, ...] = ()
    # The built-in rules apply after yours; a rule of yours with the same `from` replaces one.
    builtin_rewrites: bool = True
    kinds: dict[str, Mode] = Field(default_factory=dict)
    # The mode of every kind that pins by default and that `kinds` leaves unset: `audit` is the
    # first step of a rollout.
    mode: Mode | None = None
    output: OutputForm = OutputForm.TAG_AND_DIGEST
    resolver: Literal["registry", "static"] = "registry"
    digests: dict[str, str] = Field(default_factory=dict)
    registry: RegistrySettings = RegistrySettings()
    cache: CacheSettings = CacheSettings()
    limits: LimitSettings = LimitSettings()
    server: ServerSettings = ServerSettings()
    on_failure: OnFailure = OnFailure.ALLOW
    require_digest: bool = False
    namespaces: dict[str, NamespacePolicy] = Field(default_factory=dict)
    excluded_namespaces: tuple[str, ...] = ("kube-system", "pinhook-system")
    skip_annotation: SkipAnnotation = SkipAnnotation.AUTO

    _rewrite_map: RewriteMap = PrivateAttr()
    _rules: tuple[tuple[RewriteRule, bool], ...] = PrivateAttr()
    _modes: dict[str, Mode] = PrivateAttr()
    _pinning: frozenset[str] = PrivateAttr()
    _digest_table: dict[ImageRef, str] = PrivateAttr()

    @field_validator("kinds", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {key: _off(mode) for key, mode in value.items()}
        return value

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_off_mode(cls, value: Any) -> Any:
        return _off(value)

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, value: dict[str, Mode]) -> dict[str, Mode]:
        unknown = sorted(set(value) - KIND_KEYS)
        if unknown:
            raise ValueError(f"unknown kind {unknown[0]!r}; known: {', '.join(sorted(KIND_KEYS))}")
        return value

    @field_validator("digests")
    @classmethod
    def _digest_entries(cls, value: dict[str, str]) -> dict[str, str]:
        for image, digest in value.items():
            ref = _parse_for_table(image)
            if ref.digest is not None:
                raise ValueError(f"{image!r}: key must be a tagged reference, not a digest")
            if not is_valid_digest(digest):
                raise ValueError(f"{image!r}: {digest!r} is not a valid digest")
        return value

    @model_validator(mode="after")
    def _compile(self) -> Settings:
        # A chain or a duplicate raises InvalidReference: pydantic reports it for the document.
        own = [rule.rule for rule in self.rewrites]
        replaced = {rule.source for rule in own}
        builtin = [rule for rule in BUILTIN_RULES if rule.source not in replaced]
        self._rules = (
            *((rule, False) for rule in own),
            *((rule, True) for rule in (builtin if self.builtin_rewrites else ())),
        )
        self._rewrite_map = RewriteMap(rule for rule, _ in self._rules)
        self._modes = {
            key: self.mode if self.mode is not None and default in PINNING else default
            for key, default in DEFAULT_MODES.items()
        } | dict(self.kinds)
        # The kinds a namespace's mode applies to: those that pin by `kinds` or by default,
        # whatever the global `mode` made of them.
        self._pinning = frozenset(
            key for key, mode in (dict(DEFAULT_MODES) | dict(self.kinds)).items() if mode in PINNING
        )
        self._digest_table = {
            _parse_for_table(image): digest for image, digest in self.digests.items()
        }
        return self

    @property
    def rewrite_map(self) -> RewriteMap:
        return self._rewrite_map

    @property
    def effective_rules(self) -> tuple[tuple[RewriteRule, bool], ...]:
        """Every rule that applies, in order, each with whether it is built in."""
        return self._rules

    @property
    def digest_table(self) -> dict[ImageRef, str]:
        """The static ``digests:`` table keyed by normalised tagged reference."""
        return self._digest_table

    def mode_for(self, kind_key: str, namespace: str | None = None) -> Mode:
        """The kind's mode (``kinds``, else ``mode`` for a kind that pins by default, else its
        default), replaced by the namespace's ``mode`` for a kind that pins by ``kinds`` or by
        default."""
        if namespace is not None and kind_key in self._pinning:
            override = self.namespaces.get(namespace)
            if override is not None and override.mode is not None:
                return override.mode
        return self._modes.get(kind_key, Mode.OFF)

    def modes_for(self, kind_key: str) -> frozenset[Mode]:
        """Every mode an object of the kind gets in some namespace (for the webhook
        configuration, which cannot tell namespaces apart)."""
        return frozenset(
            [self.mode_for(kind_key), *(self.mode_for(kind_key, ns) for ns in self.namespaces)]
        )

    def policy_for(self, namespace: str | None) -> FailurePolicy:
        override = self.namespaces.get(namespace or "")
        if override is None:
            return FailurePolicy(on_failure=self.on_failure, require_digest=self.require_digest)
        return FailurePolicy(
            on_failure=override.on_failure or self.on_failure,
            require_digest=(
                self.require_digest if override.require_digest is None else override.require_digest
            ),
        )

    def skip_honoured(self, policy: FailurePolicy) -> bool:
        """Whether the skip annotation is honoured where ``policy`` applies."""
        if self.skip_annotation is SkipAnnotation.AUTO:
            return not policy.require_digest
        return self.skip_annotation is SkipAnnotation.HONOURED


def _off(value: Any) -> Any:
    # YAML 1.1 reads a bare `off` as false; `pods: off` must mean what it says.
    return "off" if value is False else value


def _parse_for_table(image: str) -> ImageRef:
    ref = ImageRef.parse(image)  # InvalidReference is a ValueError: reported at the field
    return ref.with_tag(ref.tag_or_latest()) if ref.digest is None else ref


def load_settings(text: str, *, source: str = "config") -> Settings:
    """Parse and validate one YAML document; raises ConfigError naming every bad field."""
    return _validate(_parse(text, source), source)


def load_settings_file(path: Path) -> Settings:
    """The settings in a file, a directory of ``*.yaml`` files or a ConfigMap manifest."""
    return load_settings_files([path])


def load_settings_files(paths: Sequence[Path]) -> Settings:
    """The settings of several files (see ``load_settings_file``), merged (``configfiles``)."""
    documents = [
        (source, _parse(text, source)) for path in paths for source, text in config_texts(path)
    ]
    return _validate(merge_documents(documents), sources(documents))


def _parse(text: str, source: str) -> dict[str, Any]:
    data = read_yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping", [f"got {type(data).__name__}"])
    return data


def _validate(data: dict[str, Any], source: str) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid configuration", _describe(exc)) from None


def warnings_for(settings: Settings) -> list[str]:
    """What a valid configuration still gets wrong on this machine (``check-config``)."""
    found = []
    path = settings.registry.docker_config
    if path is not None and not path.is_file():
        found.append(f"registry.dockerConfig: {path} does not exist (here)")
    allowed = {host.strip().lower() for host in settings.registry.allowed_hosts}
    for mirrors in settings.registry.mirrors.values():
        for mirror in mirrors:
            bare, _ = split_host_port(mirror.host)
            keys = {bare, f"[{bare}]", mirror.host}
            if parse_ip_literal(bare) is not None and allowed.isdisjoint(keys):
                found.append(
                    f"registry.mirrors: {mirror.host} is an IP address; the private-address"
                    " guard refuses it unless it is in registry.allowedHosts"
                )
    return found


def default_settings() -> Settings:
    return Settings()


def settings_from(paths: Path | Sequence[Path] | None) -> Settings:
    """The settings a command's ``--config`` names (one path, or several merged), else the
    defaults."""
    if isinstance(paths, Path):
        paths = [paths]
    return load_settings_files(paths) if paths else default_settings()


def _describe(exc: ValidationError) -> list[str]:
    lines = []
    for error in exc.errors(include_url=False):
        location = _location(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{location}: {message}" if location else message)
    return lines


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
