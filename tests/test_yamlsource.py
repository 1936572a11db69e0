"""Edits through source spans change the edited strings and nothing else, byte for byte."""

from __future__ import annotations

import pytest

from webhook.yamlsource import (
    SourceStr,
    YamlSourceError,
    load_documents,
    render_scalar,
    replace_strings,
    string_at,
)

MANIFESTS = (
    "# Source: chart/templates/pod.yaml\r\n"  # Helm output, with Windows line ends
    "apiVersion: v1\r\n"
    "kind: Pod\r\n"
    "metadata: {name: web, labels: {app: web}}   # flow style\r\n"
    "spec:\r\n"
    "    containers:                          # four-space indent, kept\r\n"
    '    -   image: "nginx:1.27"              # double quotes\r\n'
    "        name: web\r\n"
    "    -   name: sidecar\r\n"
    "        image: &proxy 'envoyproxy/envoy:v1.30'\r\n"
    "    initContainers: [{name: init, image: busybox}]\r\n"
    "--- # second document\r\n"
    "kind: Pod\r\n"
    "spec:\r\n"
    "  containers:\r\n"
    "  - image: registry.example.com/team/app:2.0\r\n"
    "...\r\n"
)
DIGEST = "@sha256:" + "a" * 64


def images(text: str) -> list[SourceStr]:
    found = []
    for document in load_documents(text):
        for pointer in (
            "/spec/containers/0/image",
            "/spec/containers/1/image",
            "/spec/initContainers/0/image",
        ):
            value = string_at(document.data, pointer)
            if value is not None:
                found.append(value)
    return found


def test_only_the_edited_scalars_change_byte_for_byte() -> None:
    edits = {image.span: image + DIGEST for image in images(MANIFESTS)}
    assert len(edits) == 4
    expected = (
        MANIFESTS.replace('"nginx:1.27"', f'"nginx:1.27{DIGEST}"')
        .replace("'envoyproxy/envoy:v1.30'", f"'envoyproxy/envoy:v1.30{DIGEST}'")
        .replace("image: busybox}", f"image: busybox{DIGEST}}}")
        .replace("team/app:2.0\r\n", f"team/app:2.0{DIGEST}\r\n")
    )
    assert replace_strings(MANIFESTS, edits) == expected


def test_spans_report_lines_for_messages() -> None:
    first, second, init, other = images(MANIFESTS)
    assert (first.span.line, first.span.column, first.span.style) == (7, 16, '"')
    assert second.span.style == "'" and init.span.style is None
    assert other.span.line == 16
    # Where each document's content starts, past comments and markers.
    assert [d.line for d in load_documents(MANIFESTS)] == [2, 13]


def test_a_string_reached_through_an_alias_is_one_edit() -> None:
    text = "a: &img nginx:1.27\nb: *img\n"
    [document] = load_documents(text)
    assert string_at(document.data, "/a").span == string_at(document.data, "/b").span  # type: ignore[union-attr]
    value = string_at(document.data, "/b")
    assert value is not None
    assert replace_strings(text, {value.span: "nginx:1.28"}) == "a: &img nginx:1.28\nb: *img\n"


@pytest.mark.parametrize(
    ("value", "style", "written"),
    [
        ("nginx:1.27@sha256:ab", None, "nginx:1.27@sha256:ab"),
        ("it's", "'", "'it''s'"),
        ("nginx", '"', '"nginx"'),
        # Plain would read back as another type or break the structure: quoted instead.
        ("yes", None, '"yes"'),
        ("123", None, '"123"'),
        ("a: b", None, '"a: b"'),
        ("-x", None, '"-x"'),
        ("nginx:1.27", "|", '"nginx:1.27"'),
    ],
)
def test_values_are_written_in_the_span_style_where_it_holds_them(
    value: str, style: str | None, written: str
) -> None:
    assert render_scalar(value, style) == written


def test_a_block_scalar_is_replaced_up_to_its_content_and_the_next_key_stays() -> None:
    text = "spec:\n  image: >-\n    nginx:1.27\n\n  name: web  # kept\nnext: |\n  x\n"
    [document] = load_documents(text)
    value = string_at(document.data, "/spec/image")
    assert value is not None and value.span.style == ">"
    edited = replace_strings(text, {value.span: "nginx:1.27" + DIGEST})
    assert edited == text.replace(">-\n    nginx:1.27", f'"nginx:1.27{DIGEST}"')
    assert load_documents(edited)[0].data == {
        "spec": {"image": "nginx:1.27" + DIGEST, "name": "web"},
        "next": "x\n",
    }


def test_non_strings_and_missing_paths_are_not_editable() -> None:
    [document] = load_documents("spec: {replicas: 3, image: [x]}\n")
    assert string_at(document.data, "/spec/replicas") is None
    assert string_at(document.data, "/spec/image") is None
    assert string_at(document.data, "/spec/missing/0") is None


def test_invalid_yaml_names_the_position() -> None:
    with pytest.raises(YamlSourceError, match="line 2, column"):
        load_documents("a: 1\n b: [\n")
