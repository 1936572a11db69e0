"""kubectl as the user runs it, for what only the CLI shows: its error messages, ``debug``."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

KUBECTL_TIMEOUT_S: Final = 60.0


@dataclass(frozen=True)
class Kubectl:
    binary: str
    kubeconfig: Path

    @classmethod
    def find(cls, kubeconfig: Path) -> Kubectl:
        """The kubectl on PATH; FileNotFoundError says where to get one."""
        binary = shutil.which("kubectl")
        if binary is None:
            raise FileNotFoundError(
                "kubectl is not on PATH: scripts/ensure-cluster --build prints the directory of "
                "the one built with the control plane"
            )
        return cls(binary, kubeconfig)

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binary, "--kubeconfig", str(self.kubeconfig), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=KUBECTL_TIMEOUT_S,
            check=False,
        )

    def create(self, document: dict[str, Any]) -> Created:
        """``kubectl create -f -``, timed from start to exit."""
        started = time.monotonic()
        result = self.run("create", "-f", "-", stdin=json.dumps(document))
        return Created(result.returncode, result.stdout, result.stderr, time.monotonic() - started)


@dataclass(frozen=True)
class Created:
    returncode: int
    stdout: str
    stderr: str  # the user's view: kubectl's errors, and warnings from admission webhooks
    seconds: float
