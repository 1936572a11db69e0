"""Keep secrets out of what pinhook says: warnings, audit annotations, logs and metrics.

Registry and token-service answers are text chosen by whoever runs the registry, and an image
name chooses the registry. Such text is passed on only through :func:`scrub`: credentials in
any form pinhook or a registry uses are replaced, and the text is cut to a length a person
reads. Applied where that text enters pinhook's own errors (``errors.ResolveError``), so no
path can forget it.
"""

from __future__ import annotations

import re
from typing import Final

MAX_TEXT: Final = 500
REDACTED: Final = "[redacted]"

_PATTERNS: Final = (
    # Authorization values, however they were echoed: "Basic dXNlcjpwYXNz", "Bearer eyJ..."
    (re.compile(r"(?i)\b(basic|bearer)(\s+|%20|\+)[A-Za-z0-9._~+/=%-]{4,}"), rf"\1\2{REDACTED}"),
    # userinfo in a URL: https://user:password@host/
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@"), rf"\1{REDACTED}@"),
    # JSON web tokens anywhere
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), REDACTED),
    # key=value and "key": "value" forms of secret-looking fields
    (
        re.compile(
            r"(?i)(\b(?:access_token|refresh_token|id_token|token|password|passwd|secret|"
            r"identitytoken|registrytoken|auth)\b[\"']?\s*[:=]\s*[\"']?)[^\"'\s,;&}]+"
        ),
        rf"\1{REDACTED}",
    ),
)


def scrub(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` with anything that looks like a credential replaced, at most ``limit`` long."""
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text
