"""Where a configuration is read from, and how several files make one document.

A configuration may be one YAML file, a directory of them (``*.yaml``, as a ConfigMap volume
mounts each key of the ConfigMap), or a ConfigMap manifest (each ``*.yaml`` data key). Several
documents are merged, so that the kustomize components can each add a key to the ConfigMap
(``configMapGenerator`` with ``behavior: merge``) and an operator can add rewrite rules in a
file of their own instead of copying ``config.yaml``.

The merge does not depend on the order of the files: mappings merge key by key, lists are
concatenated (rules from several files add up), and a value set differently in two files is an
error naming both, so no file silently overrides another.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any, Final

import yaml

from .errors import ConfigError
from .files import file_stamp

SUFFIXES: Final = (".yaml", ".yml")
Document = tuple[str, Any]  # (where it came from, the parsed YAML)


def config_texts(path: Path) -> list[tuple[str, str]]:
    """The YAML texts at ``path`` with where each came from, in name order."""
    if path.is_dir():
        files = _yaml_files(path)
        if not files:
            raise ConfigError(f"{path}: no *.yaml file in the directory")
        return [(str(file), read_text(file)) for file in files]
    text = read_text(path)
    data = _configmap_data(text)
    if data is None:
        return [(str(path), text)]
    keys = sorted(key for key in data if key.endswith(SUFFIXES))
    if not keys or not all(isinstance(data[key], str) for key in keys):
        raise ConfigError(f"{path}: ConfigMap has no *.yaml data key (such as config.yaml)")
    return [(f"{path} ({key})", data[key]) for key in keys]


def config_stamp(path: Path) -> Hashable:
    """What tells one version of the configuration at ``path`` from the next."""
    if path.is_dir():
        return tuple((file.name, file_stamp(file)) for file in _yaml_files(path))
    return file_stamp(path)


def merge_documents(documents: Sequence[Document]) -> Any:
    """One document from several; raises ConfigError when two set one value differently."""
    if len(documents) == 1:
        return documents[0][1]
    merged: dict[str, Any] = {}
    origins: dict[tuple[str, ...], str] = {}
    for source, data in documents:
        if data is None:
            continue
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: must be a mapping", [f"got {type(data).__name__}"])
        _merge_into(merged, data, (), source, origins)
    return merged


def _merge_into(
    into: dict[str, Any],
    extra: dict[str, Any],
    path: tuple[str, ...],
    source: str,
    origins: dict[tuple[str, ...], str],
) -> None:
    for key, value in extra.items():
        where = (*path, str(key))
        if key not in into:
            into[key] = value
            origins[where] = source
            continue
        current = into[key]
        if isinstance(current, dict) and isinstance(value, dict):
            into[key] = dict(current)
            _merge_into(into[key], value, where, source, origins)
        elif isinstance(current, list) and isinstance(value, list):
            into[key] = [*current, *value]
        elif current != value:
            # A mapping added whole is recorded at its own key only.
            first = next(
                origins[where[:n]] for n in range(len(where), 0, -1) if where[:n] in origins
            )
            raise ConfigError(
                f"{'.'.join(where)} is set in both {first} and {source}",
                [f"{first}: {current!r}", f"{source}: {value!r}"],
            )


def _yaml_files(directory: Path) -> list[Path]:
    # A ConfigMap volume also holds ..data and ..<timestamp> entries: hidden, left out.
    return sorted(
        entry
        for entry in directory.iterdir()
        if entry.name.endswith(SUFFIXES) and not entry.name.startswith(".") and entry.is_file()
    )


def _configmap_data(text: str) -> dict[str, Any] | None:
    """The data of a ConfigMap manifest; None when the text is not one."""
    try:
        document = read_yaml(text, "")
    except ConfigError:
        return None  # reported when the text is parsed as a configuration
    if not isinstance(document, dict) or document.get("kind") != "ConfigMap":
        return None
    data = document.get("data")
    return data if isinstance(data, dict) else {}


def read_text(path: Path) -> str:
    """A UTF-8 text file (a ConfigMap key always is); ConfigError saying why it is not."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read", [exc.strerror or str(exc)]) from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{path}: UTF-16 text", ["save it as UTF-8"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text", [f"byte {exc.start} is not valid UTF-8"]
        ) from None


# libyaml's parser when PyYAML has it: the pure-Python one takes seconds for a map of
# thousands of rules.
_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _StrictLoader(_SafeLoader):  # type: ignore[misc]
    """SafeLoader that refuses a key given twice in one mapping, where YAML lets the last win
    silently: two `rewrites:` or two `requireDigest:` are a mistake to report, not to guess."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"key {key!r} is given twice",
                    key_node.start_mark,
                )
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def read_yaml(text: str, source: str) -> Any:
    """One YAML document, strictly: ConfigError for anything that is not readable YAML."""
    try:
        return yaml.load(text, Loader=_StrictLoader) if text.strip() else None  # noqa: S506
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML", [str(exc)]) from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML", ["nested too deeply"]) from None


def sources(documents: Iterable[Document]) -> str:
    return ", ".join(source for source, _ in documents)
