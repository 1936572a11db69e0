"""YAML documents that remember where each string came from, for edits that change only those
strings.

``pinhook pin`` rewrites image references in manifests kept in git. Re-emitting a document, even
with a round-trip library, can change what a reviewer must then read past: indentation of
sequences, line width, quoting, ``---`` and ``...`` markers, anchors. Instead every string scalar
is loaded as a :class:`SourceStr` that knows its span in the text (PyYAML's composer marks), and
an edit replaces exactly that span, written in the scalar's own style. Everything else in the
file stays byte for byte as it was.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jsonpointer
import yaml


class YamlSourceError(ValueError):
    """The text is not YAML; the message names the line and column."""


@dataclass(frozen=True, slots=True)
class Span:
    """Where a scalar is written: character offsets ``[start, end)`` and its quoting style."""

    start: int
    end: int
    style: str | None  # None (plain), "'", '"', "|" or ">"
    line: int  # 1-based, for messages
    column: int  # 1-based


class SourceStr(str):
    """A string scalar together with its :class:`Span`."""

    span: Span

    def __new__(cls, value: str, span: Span) -> SourceStr:
        text = super().__new__(cls, value)
        text.span = span
        return text


@dataclass(frozen=True, slots=True)
class Document:
    data: Any  # plain dicts, lists and scalars; strings are SourceStr
    line: int  # where the document starts, 1-based


class _Loader(yaml.SafeLoader):
    """SafeLoader whose strings carry their source span."""


def _construct_str(loader: _Loader, node: yaml.ScalarNode) -> SourceStr:
    value = loader.construct_scalar(node)
    start, end = node.start_mark, node.end_mark
    assert start.buffer is not None
    index = _past_properties(start.buffer, start.index)
    line = start.line + start.buffer.count("\n", start.index, index)
    column = index - start.buffer.rfind("\n", 0, index)
    stop = end.index
    if node.style in ("|", ">"):
        # A block scalar's mark runs past its last line break into the next line's indentation;
        # the edit must end where the content does, or it would join the next key to its line.
        stop = index + len(start.buffer[index:stop].rstrip())
    span = Span(index, stop, node.style, line + 1, column)
    return SourceStr(str(value), span)


def _past_properties(text: str, index: int) -> int:
    """Where the scalar itself begins: a node's mark includes its ``&anchor`` and ``!tag``."""
    while index < len(text) and text[index] in "&!":
        while index < len(text) and not text[index].isspace():
            index += 1
        while index < len(text) and text[index].isspace():
            index += 1
    return index


_Loader.add_constructor("tag:yaml.org,2002:str", _construct_str)


def load_documents(text: str) -> list[Document]:
    """Every document of a YAML stream (empty ones left out); raises YamlSourceError."""
    loader = _Loader(text)
    documents: list[Document] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            documents.append(Document(loader.construct_document(node), node.start_mark.line + 1))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise YamlSourceError(f"not valid YAML at {where}: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise YamlSourceError(f"not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    return documents


def string_at(data: Any, pointer: str) -> SourceStr | None:
    """The string at an RFC 6901 JSON pointer, when it is a string from the source."""
    node = jsonpointer.resolve_pointer(data, pointer, None)
    return node if isinstance(node, SourceStr) else None


def replace_strings(text: str, edits: Mapping[Span, str]) -> str:
    """``text`` with each span replaced by its new value, written in the span's style.

    One span may be reached through several paths (an anchor and its aliases): it is one edit.
    """
    out: list[str] = []
    position = 0
    for span in sorted(edits, key=lambda s: s.start):
        if span.start < position:
            raise ValueError(f"overlapping edits at line {span.line}")
        out.append(text[position : span.start])
        out.append(render_scalar(edits[span], span.style))
        position = span.end
    out.append(text[position:])
    return "".join(out)


# What a plain scalar may be without turning into another type or another structure: no
# leading indicator, no ": " or " #", and not a YAML 1.1 boolean, null or number.
_PLAIN_SAFE = re.compile(r"[A-Za-z0-9_./][A-Za-z0-9_./:@+=~-]*")


def render_scalar(value: str, style: str | None) -> str:
    """``value`` as a YAML scalar in ``style``, or double-quoted where that style cannot hold it."""
    if style == "'" and "\n" not in value:
        return "'" + value.replace("'", "''") + "'"
    if style is None and _PLAIN_SAFE.fullmatch(value) and _reads_back(value):
        return value
    # Block styles included: a one-line image reference reads best as a quoted string.
    return json.dumps(value, ensure_ascii=False)


def _reads_back(value: str) -> bool:
    try:
        return bool(yaml.safe_load(value) == value)
    except yaml.YAMLError:
        return False
