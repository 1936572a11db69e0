"""Flags that several commands share, and the ``PINHOOK_*`` environment variables that stand in
for them (``cli.ENVIRONMENT`` lists them all; a flag given wins)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def env(name: str, default: str | None = None) -> str | None:
    """The environment variable ``PINHOOK_<name>``."""
    return os.environ.get(f"PINHOOK_{name}", default)


def path_env(name: str) -> Path | None:
    value = env(name)
    return Path(value) if value else None


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """``--config`` (``$PINHOOK_CONFIG``) and ``--docker-config``
    (``$PINHOOK_DOCKER_CONFIG_FILE``); ``config.settings_from(args.config)`` loads the first."""
    parser.add_argument(
        "--config",
        type=Path,
        default=path_env("CONFIG"),
        help="config.yaml, a ConfigMap manifest holding it, or a directory of *.yaml files"
        " merged into one (a ConfigMap volume); default: the built-in map",
    )
    parser.add_argument(
        "--docker-config",
        type=Path,
        default=path_env("DOCKER_CONFIG_FILE"),
        help="docker config.json with registry credentials",
    )


def add_config_files_flag(parser: argparse.ArgumentParser) -> None:
    """``--config``, repeatable, for the commands that merge several files; the default is
    ``$PINHOOK_CONFIG``, which the first flag given replaces."""
    default = path_env("CONFIG")
    parser.add_argument(
        "--config",
        type=Path,
        action=_Repeated,
        default=[default] if default else None,
        help="pinhook config.yaml, a directory of *.yaml, or a ConfigMap holding them;"
        " repeatable, all merged (default: $PINHOOK_CONFIG, else built-in)",
    )


class _Repeated(argparse.Action):
    """``append``, except that the first value given replaces the default instead of adding
    to it (argparse's own ``append`` adds to a non-empty default)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest)
        kept = [] if current is None or current is self.default else current
        setattr(namespace, self.dest, [*kept, values])
