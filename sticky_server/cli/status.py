"""``sticky-server status``: a running master's stats, from its pid file or its metrics port.

sticky-server status --pid /run/app.pid          (SIGUSR1; the master writes FILE.stats)
sticky-server status --metrics 127.0.0.1:9100    (GET /stats)
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import PidFileError
from ..listener import parse_bind
from ..master.pidfile import master_holds, read_own_file, read_pid, stats_file_of

__all__ = ["STATUS_WAIT_SECONDS", "status"]

# How long `status` waits for the master to answer.
STATUS_WAIT_SECONDS = 5.0


def _fail(message: str) -> int:
    print(f"sticky-server status: {message}", file=sys.stderr)
    return 1


def status(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="sticky-server status", description="Print a running master's stats (JSON).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-p", "--pid", metavar="FILE", help="the master's --pid file")
    source.add_argument("--metrics", metavar="HOST:PORT", help="the master's --metrics address")
    args = parser.parse_args(argv)
    if args.metrics:
        return _from_metrics(args.metrics)
    return _from_pid_file(Path(args.pid))


def _from_metrics(address: str) -> int:
    try:
        bind = parse_bind(address)
    except ValueError as exc:
        return _fail(f"--metrics {address}: {exc}")
    host = bind.host or "127.0.0.1"
    connection = http.client.HTTPConnection(host, bind.port, timeout=STATUS_WAIT_SECONDS)
    try:
        connection.request("GET", "/stats")
        response = connection.getresponse()
        body = response.read().decode()
    except OSError as exc:
        return _fail(f"no answer from {address} ({exc}); is the server running with --metrics {address}?")
    finally:
        connection.close()
    if response.status != 200:
        return _fail(f"{address} answered {response.status} {response.reason}")
    sys.stdout.write(body)
    return 0


def _from_pid_file(pid_file: Path) -> int:
    try:
        pid = read_pid(pid_file)
    except (OSError, PidFileError) as exc:
        return _fail(f"cannot read a pid from {pid_file}: {exc}")
    if pid is None:
        return _fail(f"{pid_file} holds no pid")
    if not master_holds(pid_file):
        return _fail(
            f"{pid_file} names pid {pid}, but no sticky-server master holds it (left by a master that did not exit "
            "cleanly: the pid may be another process now, so nothing was signalled); is the server running?"
        )
    stats_file = stats_file_of(pid_file)
    before = stats_file.stat().st_mtime_ns if stats_file.exists() else None
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        return _fail(f"no process {pid} (from {pid_file}); is the server running?")
    deadline = time.monotonic() + STATUS_WAIT_SECONDS
    while time.monotonic() < deadline:
        if stats_file.exists() and stats_file.stat().st_mtime_ns != before:
            try:
                sys.stdout.write(read_own_file(stats_file, "the stats file"))
            except (OSError, PidFileError) as exc:
                return _fail(str(exc))
            return 0
        time.sleep(0.05)
    return _fail(f"the master (pid {pid}) wrote no stats within {STATUS_WAIT_SECONDS} s")
