"""Registry URLs compared exactly as the kubelet compares them.

The kubelet (kubernetes ``pkg/credentialprovider/keyring.go``) reads a docker config key, a
credential provider's ``matchImages`` entry and an image name each with Go's
``url.Parse("https://" + text)``, splits the host with ``net.SplitHostPort`` and into labels on
``.``, and compares label by label with ``path/filepath.Match``. This module ports those three
pieces of Go 1.26 (what Kubernetes 1.36 is built with), so that a key matches exactly the images
it matches on a node, odd cases included:

* ports are compared as strings: a key ``reg.io:05000`` does not match ``reg.io:5000/app``, and
  a key without a port never matches an image with one, nor the other way round;
* a bracketed IPv6 host without a port keeps its brackets (``net.SplitHostPort`` refuses it),
  so its one "label" reads as a character class and matches no image;
* a key Go's URL parser refuses matches nothing: ``[`` anywhere but at the start of a host,
  two colons outside brackets, a ``%`` escape of an ASCII byte in a host, a control character.

Go works on bytes; here text is encoded as UTF-8 (undecodable bytes carried as surrogate
escapes) and decoded back the same way, so nothing is lost in between.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

# Bytes Go lets stand unescaped in a host or an IPv6 zone (net/url's encoding table).
_HOST_SAFE: Final = frozenset(
    b"!\"$&'()*+,-.0123456789:;<=>ABCDEFGHIJKLMNOPQRSTUVWXYZ[]_abcdefghijklmnopqrstuvwxyz~"
)
_USERINFO_SAFE: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._:~!$&'()*+,;=%@"
)
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
_HOST, _ZONE, _OTHER = "host", "zone", "other"
# The bytes a host or zone may hold unescaped: the safe ones, and any not ASCII.
_HOST_UNESCAPED: Final = bytes(b for b in range(256) if b >= 0x80 or b in _HOST_SAFE)
_SEPARATOR: Final = "/"


@dataclass(frozen=True, slots=True)
class GoURL:
    """What the kubelet reads from a parsed URL: ``Host`` (with ``:port``) and ``Path``."""

    host: str
    path: str


def parse_url(raw: str) -> GoURL | None:
    """Go's ``url.Parse`` of a URL that starts with ``http://`` or ``https://``.

    Returns the unescaped host (``[v6]:port`` form kept) and path, or None where Go returns an
    error.
    """
    data = _to_bytes(raw)
    if data is None:
        return None
    before, _, fragment = data.partition(b"#")
    if any(b < 0x20 or b == 0x7F for b in before):
        return None
    if fragment and _unescape(fragment, _OTHER) is None:
        return None
    scheme, _, rest = before.partition(b":")
    # A lone trailing "?" is an empty query (ForceQuery); else the query starts at the first.
    lone_mark = rest.endswith(b"?") and rest.count(b"?") == 1
    rest = rest[:-1] if lone_mark else rest.partition(b"?")[0]
    authority, slash, path = rest[2:].partition(b"/")
    host = _parse_authority(scheme.lower(), authority)
    unescaped_path = _unescape(slash + path, _OTHER)
    if host is None or unescaped_path is None:
        return None
    return GoURL(_to_text(host), _to_text(unescaped_path))


def parse_schemeless(text: str) -> GoURL | None:
    """The kubelet's ``ParseSchemelessURL``: ``https://`` + ``text``, parsed by Go's rules."""
    return parse_url("https://" + text)


def split_host_port(hostport: str) -> tuple[str, str] | None:
    """Go's ``net.SplitHostPort``: ``(host, port)`` as strings, or None where Go fails.

    ``[::1]:5000`` gives ``("::1", "5000")``; ``[::1]``, ``reg.io`` and ``a:b:c`` fail.
    """
    colon = hostport.rfind(":")
    if colon < 0:
        return None
    start, end_search = 0, 0
    if hostport.startswith("["):
        close = hostport.find("]")
        if close < 0 or close + 1 != colon:
            return None
        host = hostport[1:close]
        start, end_search = 1, close + 1
    else:
        host = hostport[:colon]
        if ":" in host:
            return None
    if "[" in hostport[start:] or "]" in hostport[end_search:]:
        return None
    return host, hostport[colon + 1 :]


def match_label(pattern: str, name: str) -> bool:
    """Go's ``path/filepath.Match`` (Unix); False where Go reports ``ErrBadPattern``."""
    try:
        return _match(pattern, name)
    except _BadPatternError:
        return False


@dataclass(frozen=True, slots=True)
class Location:
    """A schemeless URL split the way ``URLsMatch`` compares it: labels, port, path."""

    labels: tuple[str, ...]
    port: str
    path: str

    @classmethod
    def parse(cls, schemeless: str) -> Location | None:
        url = parse_schemeless(schemeless)
        if url is None:
            return None
        # The kubelet's SplitURL: a host Go cannot split is taken whole, without a port.
        host, port = split_host_port(url.host) or (url.host, "")
        return cls(tuple(host.split(".")), port, url.path)

    def matched_by(self, glob: Location) -> bool:
        """Whether ``glob`` (a key or a matchImages entry) matches this target location."""
        if glob.port != self.port or len(glob.labels) != len(self.labels):
            return False
        if not self.path.startswith(glob.path):  # a plain string prefix, as in the kubelet
            return False
        return all(match_label(g, t) for g, t in zip(glob.labels, self.labels, strict=True))


def urls_match(glob: str, target: str) -> bool:
    """The kubelet's ``URLsMatchStr``: whether schemeless ``glob`` matches ``target``."""
    glob_location = Location.parse(glob)
    target_location = Location.parse(target)
    if glob_location is None or target_location is None:
        return False
    return target_location.matched_by(glob_location)


def normalise_key(raw: str) -> str | None:
    """The kubelet's index key for a docker config key (``BasicDockerKeyring.Add``).

    ``https://`` is added when there is no ``http(s)://`` scheme, a leading ``/v1/`` or
    ``/v2/`` is cut from the path, and the key is the host plus the path unless that is empty
    or ``/``: ``https://index.docker.io/v1/`` gives ``index.docker.io``. None when Go cannot
    parse it (the kubelet logs and ignores such an entry).
    """
    value = raw if raw.startswith(("https://", "http://")) else "https://" + raw
    url = parse_url(value)
    if url is None:
        return None
    path = url.path[3:] if url.path.startswith(("/v2/", "/v1/")) else url.path
    return url.host + path if path not in ("", "/") else url.host


# -- net/url ------------------------------------------------------------------------------


def _parse_authority(scheme: bytes, authority: bytes) -> bytes | None:
    at = authority.rfind(b"@")
    host = _parse_host(scheme, authority[at + 1 :])
    if host is None or at < 0:
        return host
    userinfo = authority[:at]
    if not _USERINFO_SAFE.issuperset(userinfo):
        return None
    if any(_unescape(part, _OTHER) is None for part in userinfo.split(b":", 1)):
        return None
    return host


def _parse_host(scheme: bytes, host: bytes) -> bytes | None:
    bracket = host.rfind(b"[")
    if bracket > 0:
        return None
    if bracket == 0:
        return _parse_ip_literal(host)
    colon = host.find(b":")
    if colon >= 0:
        last = host.rfind(b":")
        # Go 1.26 (urlstrictcolons) allows one colon only in http(s) hosts.
        if last != colon and scheme not in (b"http", b"https"):
            colon = last
        if not _valid_optional_port(host[colon:]):
            return None
    return _unescape(host, _HOST)


def _parse_ip_literal(host: bytes) -> bytes | None:
    close = host.rfind(b"]")
    if close < 0:
        return None
    colon_port = host[close + 1 :]
    if not _valid_optional_port(colon_port):
        return None
    hostname = host[1:close]
    zone = hostname.find(b"%25")
    if zone >= 0:
        address, zone_id = _unescape(hostname[:zone], _HOST), _unescape(hostname[zone:], _ZONE)
        unescaped = None if address is None or zone_id is None else address + zone_id
    else:
        unescaped = _unescape(hostname, _HOST)
    if unescaped is None or not _is_ipv6(unescaped):
        return None
    return b"[" + unescaped + b"]" + colon_port


def _is_ipv6(address: bytes) -> bool:
    # netip.ParseAddr, minus IPv4 (Go refuses "[1.2.3.4]" as an IP-literal).
    try:
        ipaddress.IPv6Address(address.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def _valid_optional_port(port: bytes) -> bool:
    return not port or (port[:1] == b":" and all(0x30 <= b <= 0x39 for b in port[1:]))


def _unescape(text: bytes, mode: str) -> bytes | None:
    """Go's ``unescape``: None for a malformed escape or a byte the mode does not allow."""
    if b"%" not in text:  # most: a registry's host and a path, looked up on every miss
        if mode in (_HOST, _ZONE) and text.translate(None, _HOST_UNESCAPED):
            return None
        return text
    out = bytearray()
    i = 0
    while i < len(text):
        byte = text[i]
        if byte == 0x25:  # '%'
            if i + 2 >= len(text) or text[i + 1] not in _HEX or text[i + 2] not in _HEX:
                return None
            value = int(text[i + 1 : i + 3], 16)
            is_percent = text[i : i + 3] == b"%25"
            if mode == _HOST and value < 0x80 and not is_percent:
                return None  # a host may escape only non-ASCII bytes
            if mode == _ZONE and not is_percent and value != 0x20 and value not in _HOST_SAFE:
                return None
            out.append(value)
            i += 3
            continue
        if mode in (_HOST, _ZONE) and byte < 0x80 and byte not in _HOST_SAFE:
            return None
        out.append(byte)
        i += 1
    return bytes(out)


def _to_bytes(text: str) -> bytes | None:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate no Go string can hold
        return None


def _to_text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


# -- path/filepath.Match ----------------------------------------------------------------


class _BadPatternError(Exception):
    pass


def _match(pattern: str, name: str) -> bool:
    while pattern:
        star, chunk, pattern = _scan_chunk(pattern)
        if star and not chunk:
            return _SEPARATOR not in name
        rest = _match_chunk(chunk, name)
        if rest is not None and (not rest or pattern):
            name = rest
            continue
        if star and (rest := _match_after_star(chunk, name, pattern)) is not None:
            name = rest
            continue
        return False
    return not name


def _match_after_star(chunk: str, name: str, pattern: str) -> str | None:
    """What is left of ``name`` once the star before ``chunk`` took some of it."""
    for i, char in enumerate(name):
        if char == _SEPARATOR:
            break
        rest = _match_chunk(chunk, name[i + 1 :])
        if rest is not None and (pattern or not rest):
            return rest
    return None


def _scan_chunk(pattern: str) -> tuple[bool, str, str]:
    stripped = pattern.lstrip("*")
    star = len(stripped) != len(pattern)
    in_range = False
    i = 0
    while i < len(stripped):
        char = stripped[i]
        if char == "\\":
            if i + 1 < len(stripped):
                i += 1
        elif char == "[":
            in_range = True
        elif char == "]":
            in_range = False
        elif char == "*" and not in_range:
            return star, stripped[:i], stripped[i:]
        i += 1
    return star, stripped, ""


def _match_chunk(chunk: str, text: str) -> str | None:
    """What is left of ``text`` after ``chunk``, or None when it does not match.

    Like Go, it reads the whole chunk even after a mismatch, so a malformed one always raises.
    """
    failed = False
    while chunk:
        failed = failed or not text
        head = chunk[0]
        if head == "[":
            char = ""
            if not failed:
                char, text = text[0], text[1:]
            in_class, chunk = _match_class(chunk[1:], char)
            failed = failed or not in_class
        elif head == "?":
            if not failed:
                failed = text[0] == _SEPARATOR
                text = text[1:]
            chunk = chunk[1:]
        else:
            if head == "\\":
                chunk = chunk[1:]
                if not chunk:
                    raise _BadPatternError
            if not failed:
                failed = chunk[0] != text[0]
                text = text[1:]
            chunk = chunk[1:]
    return None if failed else text


def _match_class(chunk: str, char: str) -> tuple[bool, str]:
    """Whether ``char`` is in the class ``chunk`` opens (after ``[``); and the chunk after it."""
    negated = chunk.startswith("^")
    if negated:
        chunk = chunk[1:]
    matched = False
    ranges = 0
    while True:
        if chunk.startswith("]") and ranges:
            return matched != negated, chunk[1:]
        low, chunk = _class_char(chunk)
        high = low
        if chunk[0] == "-":
            high, chunk = _class_char(chunk[1:])
        matched = matched or (char != "" and low <= char <= high)
        ranges += 1


def _class_char(chunk: str) -> tuple[str, str]:
    if not chunk or chunk[0] in "-]":
        raise _BadPatternError
    if chunk[0] == "\\":
        chunk = chunk[1:]
        if not chunk:
            raise _BadPatternError
    char, rest = chunk[0], chunk[1:]
    if "\udc80" <= char <= "\udcff" or not rest:  # an invalid UTF-8 byte, or nothing after
        raise _BadPatternError
    return char, rest
