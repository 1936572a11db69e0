"""Flags that several commands share, and the ``PINHOOK_*`` environment variables that stand in
for them (``cli.ENVIRONMENT`` lists them all; a flag given wins)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


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
