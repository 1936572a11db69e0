"""Files that change under a running webhook: the mounted config, credentials and certificates."""

from __future__ import annotations

from pathlib import Path

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
