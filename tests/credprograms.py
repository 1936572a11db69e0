"""Credential programs of our own for tests: a kubelet credential provider plugin and a docker
credential helper, both small Python scripts speaking the real protocols.

Each run appends one JSON line to a log (its argv, stdin, pid and ``PINHOOK_TEST_*``
environment) and then plays the next entry of a script of answers:

* ``{"response": {...}}``: print this CredentialProviderResponse (or helper answer) as JSON;
* ``{"raw": "text"}``: print exactly this;
* ``{"exit": 1, "stdout": "...", "stderr": "..."}``: fail that way;
* ``"started"`` / ``"gate"`` (paths of FIFOs) before any of those: write to ``started`` once
  running, then wait until the test writes to ``gate``, so a test can hold an exec open and
  release it on an event, without sleeping.

The last answer repeats once the script runs out.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from tests.harness.fixtures import RegistryEnv
from webhook.config import Settings, load_settings

V1 = "credentialprovider.kubelet.k8s.io/v1"

_SCRIPT = """#!{python}
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
log_path = os.path.join(here, os.path.basename(__file__) + ".log")
answers_path = os.path.join(here, os.path.basename(__file__) + ".answers")
stdin = sys.stdin.read()
record = {{
    "argv": sys.argv[1:],
    "stdin": stdin,
    "pid": os.getpid(),
    "env": {{k: v for k, v in os.environ.items() if k.startswith("PINHOOK_TEST_")}},
}}
with open(log_path, "a") as log:
    log.write(json.dumps(record) + "\\n")
with open(log_path) as log:
    calls = sum(1 for _ in log)
with open(answers_path) as f:
    answers = json.load(f)
answer = answers[min(calls, len(answers)) - 1]
if "started" in answer:
    with open(answer["started"], "w") as fifo:
        fifo.write("started\\n")
if "gate" in answer:
    with open(answer["gate"]) as fifo:
        fifo.read()
if "exit" in answer:
    sys.stdout.write(answer.get("stdout", ""))
    sys.stderr.write(answer.get("stderr", ""))
    sys.exit(answer["exit"])
sys.stdout.write(answer["raw"] if "raw" in answer else json.dumps(answer["response"]))
"""


class Program:
    """A scripted credential program at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.write_text(_SCRIPT.format(python=sys.executable))
        self.path.chmod(0o755)
        self._log = path.with_name(path.name + ".log")
        self._answers = path.with_name(path.name + ".answers")
        self.answer({"raw": ""})

    def answer(self, *answers: dict[str, Any]) -> None:
        """Play these answers from now on (the call count restarts)."""
        self._answers.write_text(json.dumps(list(answers)))
        self._log.unlink(missing_ok=True)

    @property
    def calls(self) -> list[dict[str, Any]]:
        if not self._log.exists():
            return []
        return [json.loads(line) for line in self._log.read_text().splitlines()]


def provider_response(
    auth: dict[str, tuple[str, str]],
    *,
    key_type: str = "Registry",
    duration: str | None = None,
    api_version: str = V1,
    **extra: Any,
) -> dict[str, Any]:
    response: dict[str, Any] = {
        "apiVersion": api_version,
        "kind": "CredentialProviderResponse",
        "cacheKeyType": key_type,
        "auth": {key: {"username": u, "password": p} for key, (u, p) in auth.items()},
    }
    if duration is not None:
        response["cacheDuration"] = duration
    response.update(extra)
    return {"response": response}


class Gate:
    """A held exec: the program reports it started, and waits until :meth:`release`."""

    def __init__(self, directory: Path) -> None:
        self.started_path = directory / "started.fifo"
        self.gate_path = directory / "gate.fifo"
        os.mkfifo(self.started_path)
        os.mkfifo(self.gate_path)

    def hold(self, answer: dict[str, Any]) -> dict[str, Any]:
        return {**answer, "started": str(self.started_path), "gate": str(self.gate_path)}

    async def started(self) -> None:
        await asyncio.to_thread(self.started_path.read_text)

    async def release(self) -> None:
        await asyncio.to_thread(self.gate_path.write_text, "go")


def token_settings(env: RegistryEnv, extra: str = "") -> Settings:
    """Settings that reach a token-auth test registry and its token issuer on loopback."""
    assert env.issuer is not None
    realm = env.issuer.url.removeprefix("http://").rstrip("/")
    hosts = ", ".join(f'"{h}"' for h in (env.host, realm))
    return load_settings(
        f"registry:\n  insecure: [{hosts}]\n  allowedHosts: [{hosts}]\n  timeoutSeconds: 5\n{extra}"
    )
