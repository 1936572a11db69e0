"""Running a credential program (a kubelet credential provider, a docker credential helper):
input on stdin, answer on stdout, killed when its time is up."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Enough for any credential answer; a program that writes more is not one.
MAX_OUTPUT_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Completed:
    returncode: int
    stdout: bytes
    stderr: bytes


class CommandError(Exception):
    """The program could not be started, ran out of time, or wrote too much."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


async def run_command(
    argv: Sequence[str],
    stdin: bytes,
    *,
    time_limit: float,
    env: Mapping[str, str] | None = None,
) -> Completed:
    """Run ``argv`` with ``stdin``; the process is killed after ``time_limit`` seconds or when the
    caller is cancelled. Raises :class:`CommandError`."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=None if env is None else dict(env),
        )
    except OSError as exc:
        raise CommandError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    try:
        async with asyncio.timeout(time_limit):
            stdout, stderr = await process.communicate(stdin)
    except TimeoutError:
        _kill(process)
        await process.wait()
        raise CommandError(
            f"{argv[0]} gave no answer within {time_limit:.3g}s; killed", timed_out=True
        ) from None
    except BaseException:
        _kill(process)
        raise
    if len(stdout) > MAX_OUTPUT_BYTES:
        raise CommandError(f"{argv[0]} wrote more than {MAX_OUTPUT_BYTES} bytes")
    return Completed(process.returncode or 0, stdout, stderr)


def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            process.kill()
