"""pinhook: rewrite image references and pin them to digests at admission."""

from importlib import metadata


def version() -> str:
    """The installed package's version ("unknown" when run from a bare source tree)."""
    try:
        return metadata.version("pinhook")
    except metadata.PackageNotFoundError:
        return "unknown"
