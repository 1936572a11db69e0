"""Files that change under a running webhook: the mounted config, credentials and certificates."""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

FileStamp = tuple[float, int]


def file_stamp(path: Path) -> FileStamp | None:
    """What tells one version of a file from the next (mtime and inode); None if unreadable.

    Secret and ConfigMap volumes change by swapping a symlink: stat follows it, and the new
    file has a new inode even when its mtime is the same.
    """
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime, stat.st_ino)


def read_secret(path: Path, setting: str) -> str:
    """One value mounted from a Secret (a password, a URL with one), without its final line
    break; ConfigError naming ``setting``, never the content, when there is none."""
    try:
        value = path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError(f"{setting} {path}: cannot read ({reason})") from None
    if not value:
        raise ConfigError(f"{setting} {path}: empty")
    return value
