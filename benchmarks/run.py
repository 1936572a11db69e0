"""pinhook's benchmark: one command that starts everything on loopback, measures, stops it.

    .venv/bin/python benchmarks/run.py [--quick] [--scenarios warm,cold,...]
                                      [--peer-binary PATH/TO/k8s-digester]

It prints a table, then one JSON line with every figure. What it starts: a real
docker-registry with token auth (tests/harness/), `pinhook serve` subprocesses with generated
configs and certificates, the do-nothing webhook benchmarks/noop.py on the same uvicorn stack,
and k8s-digester's webhook mode when --peer-binary is given. Load comes from wrk (Debian
package; `scripts/ensure-packages wrk`) for throughput rounds and from benchmarks/client.py,
a separate process, for exact bursts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.load import load_generator
from benchmarks.scenarios import SCENARIOS, Context, Outcome, Settings
from benchmarks.stack import BenchError
from webhook import certs


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller counts")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from: {', '.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--peer-binary",
        type=Path,
        help="a k8s-digester binary, run side by side on the warm, cold and slow-registry"
        " workloads",
    )
    args = parser.parse_args(argv)
    args.names = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = [name for name in args.names if name not in SCENARIOS]
    if unknown or not args.names:
        parser.error(f"unknown scenario {unknown}; known: {', '.join(SCENARIOS)}")
    if args.peer_binary is not None and not os.access(args.peer_binary, os.X_OK):
        parser.error(f"--peer-binary {args.peer_binary} is not an executable file")
    return args


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _raise_open_file_limit() -> None:
    # 1,000 idle clients plus the servers' own sockets need more than the usual 1,024; the
    # servers inherit the limit from this process.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings.make(args.quick)
    report: dict[str, Any] = {
        "machine": machine(),
        "quick": args.quick,
        "load_generator": load_generator(),
        "peer": str(args.peer_binary) if args.peer_binary else None,
        "scenarios": {},
    }
    print(f"machine: {report['machine']}")
    print(f"load: {report['load_generator']}")
    with tempfile.TemporaryDirectory(prefix="pinhook-bench-") as scratch:
        workdir = Path(scratch)
        paths = certs.ensure_self_signed(workdir / "certs")
        ctx = Context(workdir, paths, settings, args.peer_binary)
        for name in args.names:
            began = time.monotonic()
            print(f"\n== {name}", flush=True)
            outcome: Outcome = SCENARIOS[name](ctx)
            for label, text in outcome.rows:
                print(f"  {label:<24} {text}")
            outcome.figures["wall_seconds"] = round(time.monotonic() - began, 1)
            report["scenarios"][name] = outcome.figures
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    _raise_open_file_limit()
    try:
        report = run(args)
    except BenchError as exc:
        print(f"benchmark: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print()
    print(orjson.dumps(report).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
