"""The ``sticky-server`` command (also ``python -m sticky_server``).

    sticky-server example.worker:HttpWorker --workers 4 --bind 0.0.0.0:3000 --bind [::]:3000
    sticky-server myapp:app --asgi --workers 4 --bind :8000
    sticky-server status --pid /run/app.pid

The same command runs in the master and, re-executed by it, in every worker (as any
entry script does): the master imports the target first, so a broken import fails
before any worker starts; each worker imports it and serves it. Every option can
also come from an environment variable ``STICKY_SERVER_<OPTION>`` (``--graceful-timeout``:
``STICKY_SERVER_GRACEFUL_TIMEOUT``; a repeatable option takes a comma-separated list);
the command line wins.

Targets: ``module:name``. Without a kind flag, ``name`` is a worker class or factory,
called with the ``StickyServer`` if it takes an argument, else with none. With
``--asgi``/``--aiohttp``/``--wsgi``/``--tornado``, ``name`` is an application served
through that adapter.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import signal
import ssl
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .balancer import BALANCERS, Balancer
from .errors import PidFileError, StickyServerError
from .listener import parse_bind
from .metrics import MetricsServer
from .pidfile import read_own_file, read_pid, remove_pid_file, stats_file_of, stats_writer, write_pid_file
from .server import DEFAULT_GRACEFUL_TIMEOUT, DEFAULT_TIMEOUT, StickyServer

__all__ = ["main"]

ENV_PREFIX = "STICKY_SERVER_"
KINDS = {
    "asgi": "an ASGI app (served by uvicorn's protocols)",
    "aiohttp": "an aiohttp web.Application",
    "wsgi": "a WSGI app (gunicorn's HTTP/1.1 parser, a thread per connection; wsgiref without gunicorn)",
    "tornado": "a tornado web.Application",
}
EXIT_IMPORT = 1
# How long `status` waits for the master to write its stats after SIGUSR1.
STATUS_WAIT_SECONDS = 5.0


class _UsageError(Exception):
    """A mistake in the command line or environment: reported as argparse does, exit 2."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError(text)
    return value


def _bind(text: str) -> str:
    try:
        parse_bind(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


_positive_int.__name__ = "positive whole number"
_seconds.__name__ = "number of seconds"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sticky-server",
        description="Serve TARGET from several worker processes, each client always on the same worker.",
        epilog="Every option can also be set with STICKY_SERVER_<OPTION> (e.g. STICKY_SERVER_WORKERS=4). "
        "'sticky-server status --pid FILE' prints a running master's stats.",
    )
    parser.add_argument("target", metavar="TARGET", help="module:name of a worker factory, or of an app with a kind")
    kind = parser.add_mutually_exclusive_group()
    for name, what in KINDS.items():
        kind.add_argument(f"--{name}", dest="kind", action="store_const", const=name, help=f"TARGET is {what}")
    parser.add_argument(
        "-w", "--workers", type=_positive_int, metavar="N", help="worker processes (default: one per CPU)"
    )
    parser.add_argument(
        "-b",
        "--bind",
        action="append",
        metavar="ADDRESS",
        type=_bind,
        help="HOST:PORT, [IPV6]:PORT, :PORT or unix:/PATH; repeat for several (default: 127.0.0.1:8000)",
    )
    parser.add_argument(
        "--balancer",
        default="ip-hash",
        metavar="NAME",
        help=f"{'|'.join(BALANCERS)} or module:Class (default: ip-hash)",
    )
    parser.add_argument("--proxy-protocol", action="store_true", help="trusted peers send a PROXY v1/v2 header")
    parser.add_argument("--forwarded-header", metavar="NAME", help="route by this header: x-forwarded-for|forwarded")
    parser.add_argument(
        "--trusted-proxy",
        action="append",
        metavar="ADDRESS",
        help="an address or network whose headers are believed; repeat for several (default: loopback)",
    )
    parser.add_argument(
        "--graceful-timeout",
        type=_seconds,
        default=DEFAULT_GRACEFUL_TIMEOUT,
        metavar="SECONDS",
        help="time workers get to finish when stopped or replaced (default: 30)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="a worker silent this long is replaced; 0 turns the heartbeat off (default: 30)",
    )
    parser.add_argument("--backlog", type=_positive_int, metavar="N", help="listen backlog (default: 4096)")
    parser.add_argument("--user", help="run the workers as this user")
    parser.add_argument("--group", help="run the workers as this group")
    parser.add_argument("--certfile", metavar="FILE", help="TLS certificate (PEM) for the adapters; needs --keyfile")
    parser.add_argument("--keyfile", metavar="FILE", help="TLS private key (PEM)")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"], help="(default: info)"
    )
    parser.add_argument("--pid", metavar="FILE", help="write the master's pid here; removed at exit")
    parser.add_argument(
        "--metrics", metavar="HOST:PORT", type=_bind, help="serve Prometheus metrics at http://HOST:PORT/metrics"
    )
    return parser


def _environment_defaults(parser: argparse.ArgumentParser, environ: dict[str, str]) -> dict[str, Any]:
    """Set each option's default from STICKY_SERVER_<OPTION>, checked as the command line would be.

    Returns the values of repeatable options, which apply only when the command
    line gives none (argparse would add the command line's to them).
    """
    repeated: dict[str, Any] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "kind"):
            continue
        name = ENV_PREFIX + action.dest.upper()
        text = environ.get(name)
        if text is None:
            continue
        try:
            if isinstance(action, argparse._StoreTrueAction):
                if text.lower() not in ("1", "true", "yes", "0", "false", "no", ""):
                    raise ValueError(text)
                value: Any = text.lower() in ("1", "true", "yes")
            elif isinstance(action, argparse._AppendAction):
                value = [action.type(item) if action.type else item for item in text.split(",") if item]  # type: ignore[operator]
            else:
                value = action.type(text) if action.type else text  # type: ignore[operator]
                if action.choices is not None and value not in action.choices:
                    raise ValueError(text)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"environment variable {name}={text!r} is not a valid {action.option_strings[-1]}: {exc}")
        if isinstance(action, argparse._AppendAction):
            repeated[action.dest] = value
        else:
            parser.set_defaults(**{action.dest: value})
    return repeated


def _import_target(target: str) -> Any:
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise _UsageError(f"TARGET must be module:name (e.g. myapp:app), got {target!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as python -m and gunicorn do: the current directory's modules
    module = importlib.import_module(module_name)
    value: Any = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise _UsageError(f"module {module_name!r} has no {attribute!r} (from TARGET {target!r})") from None
    return value


def _balancer(text: str) -> Balancer | str:
    if text in BALANCERS:
        return text
    if ":" not in text:
        raise _UsageError(f"--balancer must be one of {', '.join(BALANCERS)} or module:Class, got {text!r}")
    made = _import_target(text)
    try:
        balancer = made() if inspect.isclass(made) else made
    except TypeError as exc:
        raise _UsageError(f"--balancer {text}: cannot create it with no arguments ({exc})") from None
    if not isinstance(balancer, Balancer):
        raise _UsageError(f"--balancer {text} is a {type(balancer).__name__}, not a sticky_server.Balancer subclass")
    return balancer


def _tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.certfile and not args.keyfile:
        return None
    if not (args.certfile and args.keyfile):
        raise _UsageError("--certfile and --keyfile go together; give both")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.certfile, args.keyfile)
    return context


def _worker_for(args: argparse.Namespace, target: Any, sticky: StickyServer) -> Any:
    tls = _tls(args)
    if args.kind == "asgi":
        from .adapters.asgi import ASGIWorker

        return ASGIWorker(target, ssl_context=tls, log_config=None)
    if args.kind == "aiohttp":
        from .adapters.aiohttp import AiohttpWorker

        return AiohttpWorker(target, ssl_context=tls)
    if args.kind == "wsgi":
        from .adapters.wsgi import WSGIWorker

        return WSGIWorker(target, ssl_context=tls)
    if args.kind == "tornado":
        from .adapters.tornado import TornadoWorker

        return TornadoWorker(target, ssl_context=tls)
    try:
        inspect.signature(target).bind(sticky)
    except (TypeError, ValueError):
        return target()
    return target(sticky)


def _print_user_error(headline: str, exc: BaseException) -> None:
    """``exc``'s traceback from the user's first frame on: our frames and importlib's say nothing to them."""
    ours = (__file__, "<frozen importlib", os.path.dirname(importlib.__file__))
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(ours):
        tb = tb.tb_next
    print(headline, file=sys.stderr)
    traceback.print_exception(type(exc), exc, tb, file=sys.stderr)


def status(argv: Sequence[str]) -> int:
    """``sticky-server status --pid FILE``: ask the master (SIGUSR1) for its stats and print them."""
    parser = argparse.ArgumentParser(prog="sticky-server status", description=status.__doc__)
    parser.add_argument("--pid", metavar="FILE", required=True, help="the master's --pid file")
    args = parser.parse_args(argv)
    pid_file = Path(args.pid)
    try:
        pid = read_pid(pid_file)
    except (OSError, PidFileError) as exc:
        print(f"sticky-server status: cannot read a pid from {pid_file}: {exc}", file=sys.stderr)
        return 1
    if pid is None:
        print(f"sticky-server status: {pid_file} holds no pid", file=sys.stderr)
        return 1
    stats_file = stats_file_of(pid_file)
    before = stats_file.stat().st_mtime_ns if stats_file.exists() else None
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        print(f"sticky-server status: no process {pid} (from {pid_file}); is the server running?", file=sys.stderr)
        return 1
    deadline = time.monotonic() + STATUS_WAIT_SECONDS
    while time.monotonic() < deadline:
        if stats_file.exists() and stats_file.stat().st_mtime_ns != before:
            try:
                sys.stdout.write(read_own_file(stats_file, "the stats file"))
            except (OSError, PidFileError) as exc:
                print(f"sticky-server status: {exc}", file=sys.stderr)
                return 1
            return 0
        time.sleep(0.05)
    print(
        f"sticky-server status: the master (pid {pid}) wrote no stats within {STATUS_WAIT_SECONDS} s", file=sys.stderr
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["status"]:
        return status(argv[1:])
    parser = build_parser()
    from_environment = _environment_defaults(parser, dict(os.environ))
    args = parser.parse_args(argv)
    for dest, value in from_environment.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s [%(process)d] %(name)s %(levelname)s %(message)s"
    )
    try:
        sticky = StickyServer(
            args.workers,
            balancer=_balancer(args.balancer),
            graceful_timeout=args.graceful_timeout,
            timeout=args.timeout or None,
            user=args.user,
            group=args.group,
            proxy_protocol=args.proxy_protocol,
            forwarded_header=args.forwarded_header,
            trusted_proxies=args.trusted_proxy,
            **({"backlog": args.backlog} if args.backlog else {}),
        )
        _tls(args)  # a bad certificate stops here, before any worker starts
    except (_UsageError, ValueError, TypeError, OSError) as exc:
        parser.error(str(exc))
    try:
        target = _import_target(args.target)
    except _UsageError as exc:
        parser.error(str(exc))
    except Exception as exc:
        _print_user_error(f"sticky-server: importing {args.target} failed:", exc)
        return EXIT_IMPORT
    if args.kind is None and not callable(target):
        parser.error(f"TARGET {args.target!r} is not a worker class or factory; for an app, add --asgi etc.")
    if not sticky.is_master:
        sticky.work(_worker_for(args, target, sticky))
        return 0
    metrics = None
    if args.metrics:
        try:
            metrics = MetricsServer(parse_bind(args.metrics), sticky.stats)
        except (OSError, ValueError) as exc:
            parser.error(f"--metrics {args.metrics}: {exc}")
    pid_file = Path(args.pid) if args.pid else None
    if pid_file is not None:
        try:
            write_pid_file(pid_file)
        except (OSError, PidFileError) as exc:
            if metrics is not None:
                metrics.close()
            parser.error(f"--pid {pid_file}: {exc}" if isinstance(exc, OSError) else str(exc))
        sticky.on_stats(stats_writer(stats_file_of(pid_file)))
    try:
        sticky.listen_on(args.bind or ["127.0.0.1:8000"])
    except StickyServerError as exc:  # it says what went wrong and what to do: no traceback
        print(f"sticky-server: {exc}", file=sys.stderr)
        return 1
    finally:
        if metrics is not None:
            metrics.close()
        if pid_file is not None:
            remove_pid_file(pid_file)
    return 0
