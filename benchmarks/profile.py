"""Where pinhook's CPU goes on the warm path: the `warm` workload under wrk while py-spy
samples the server, then the functions that took the most samples, by themselves and with
what they called.

    .venv/bin/python benchmarks/profile.py [--seconds 10] [--top 20] [--raw FILE]

py-spy reads the running process from outside (ptrace), so pinhook runs unmodified: the same
`pinhook serve`, config and workload as the benchmark's `warm` scenario.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.load import throughput_round
from benchmarks.scenarios import Context, Settings, _pinhook, admission, kserve_pod
from benchmarks.stack import BenchError, Registry, pinhook_config
from webhook import certs

# "name (path/to/file.py:123)" in py-spy's collapsed stacks; the line number is dropped so
# that a function counts once.
_FRAME = re.compile(r"^(?P<name>.+?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10, help="sampling time (default 10)")
    parser.add_argument("--top", type=int, default=20, help="rows per table (default 20)")
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks here")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("profile: py-spy not found (pip install py-spy)", file=sys.stderr)
        return 2
    try:
        stacks = _profile(spy, args.seconds)
    except BenchError as exc:
        print(f"profile: {exc}", file=sys.stderr)
        return 2
    if args.raw is not None:
        args.raw.write_text(stacks)
    _report(stacks, args.top)
    return 0


def _profile(spy: str, seconds: int) -> str:
    with tempfile.TemporaryDirectory(prefix="pinhook-profile-") as directory:
        workdir = Path(directory)
        paths = certs.ensure_self_signed(workdir / "certs")
        ctx = Context(workdir, paths, Settings())
        with Registry(workdir) as registry:
            body_file = workdir / "review.json"
            body_file.write_bytes(admission(kserve_pod(registry), namespace="models"))
            with _pinhook(ctx, pinhook_config(registry.host)) as server:
                throughput_round(server, body_file, 1, 16, paths)  # warm the cache
                output = workdir / "stacks.txt"
                load = threading.Thread(
                    target=throughput_round, args=(server, body_file, seconds + 2, 16, paths)
                )
                load.start()
                try:
                    subprocess.run(
                        [spy, "record", "--pid", str(server.pid), "--duration", str(seconds),
                         "--rate", "250", "--format", "raw", "--output", str(output),
                         "--nonblocking"],
                        check=True, capture_output=True, timeout=seconds + 60,
                    )  # fmt: skip
                except subprocess.CalledProcessError as exc:
                    raise BenchError(f"py-spy failed: {exc.stderr.decode().strip()}") from None
                finally:
                    load.join()
                return output.read_text()


def _report(stacks: str, top: int) -> None:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in stacks.splitlines():
        trace, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(frame) for frame in trace.split(";")]
        total += count
        own[frames[-1]] += count
        for function in set(frames):
            inclusive[function] += count
    if total == 0:
        print("profile: no samples")
        return
    for title, counts in (("own time", own), ("with callees", inclusive)):
        print(f"\n{title} ({total} samples of the server)")
        for function, count in counts.most_common(top):
            print(f"  {100 * count / total:5.1f}%  {function}")


def _function(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = path.split("/work/", 1)[-1]
    return f"{match['name']} ({path})"


if __name__ == "__main__":
    sys.exit(main())
