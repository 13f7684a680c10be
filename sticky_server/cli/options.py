"""The command's options: every flag, what it takes, and those refused with a reason.

Where each setting comes from (the command line, a config file, the environment) and
what the habits' options mean is ``settings``.

The options a uvicorn or gunicorn user types by habit are accepted with their
meaning (``--host``/``--port``/``--uds``/``--fd``, ``--factory``, ``--app-dir``,
``--env-file``, ``--max-requests``, ``-t``, ``-u``/``-g``, ``-p``, ``--proxy-headers``,
``--forwarded-allow-ips``, ``--access-log``, ``--log-config``...); those that make no
sense here (``REFUSED``) are an error saying why and what to use instead.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

from .. import __version__
from ..balancer import BALANCERS
from ..checks import check_count, check_seconds
from ..listener import MAX_BACKLOG, parse_bind
from ..server import DEFAULT_GRACEFUL_TIMEOUT, DEFAULT_TIMEOUT
from ..sessions import DEFAULT_LOAD_FACTOR
from ..steering import STEERINGS

__all__ = [
    "DEFAULT_BIND",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "ENV_PREFIX",
    "KINDS",
    "REFUSED",
    "UVICORN_OPTIONS",
    "UsageError",
    "build_parser",
    "check_bind",
    "refused_dests",
]

ENV_PREFIX = "STICKY_SERVER_"
KINDS = {
    "asgi": "an ASGI app (served by uvicorn's protocols)",
    "aiohttp": "an aiohttp web.Application",
    "wsgi": "a WSGI app (gunicorn's HTTP/1.1 parser, a thread per connection; wsgiref without gunicorn)",
    "tornado": "a tornado web.Application",
}
DEFAULT_BIND = "127.0.0.1:8000"
DEFAULT_PORT = 8000
DEFAULT_HOST = "127.0.0.1"

# Options of uvicorn's that apply to one connection or one app: dest -> uvicorn.Config keyword.
UVICORN_OPTIONS = {
    "root_path": "root_path",
    "timeout_keep_alive": "timeout_keep_alive",
    "limit_concurrency": "limit_concurrency",
    "ws": "ws",
    "ws_max_size": "ws_max_size",
    "ws_max_queue": "ws_max_queue",
    "ws_ping_interval": "ws_ping_interval",
    "ws_ping_timeout": "ws_ping_timeout",
    "ws_per_message_deflate": "ws_per_message_deflate",
    "lifespan": "lifespan",
    "http": "http",
    "interface": "interface",
    "h11_max_incomplete_event_size": "h11_max_incomplete_event_size",
    "header": "headers",
    "server_header": "server_header",
    "date_header": "date_header",
}

# Options of uvicorn's or gunicorn's that do not apply here: (flags, arguments it takes, why / what instead).
REFUSED: list[tuple[tuple[str, ...], int, str]] = [
    (
        ("-k", "--worker-class"),
        1,
        "sticky-server picks the server from the app: give the app (ASGI, WSGI, aiohttp, tornado) and, "
        "only if it cannot tell, --asgi/--wsgi/--aiohttp/--tornado",
    ),
    (
        ("--threads",),
        1,
        "the WSGI worker serves each connection on a thread of its own; there is no pool to size",
    ),
    (("-D", "--daemon"), 0, "run it in the foreground under systemd or another supervisor (see the README)"),
    (
        ("--reload-delay",),
        1,
        "--reload sends the master SIGHUP as soon as a file changes; the reload itself is gradual",
    ),
    (
        ("--timeout-notify",),
        1,
        "the master's heartbeat does that job: -t/--timeout SECONDS",
    ),
    (
        ("--limit-max-requests-jitter",),
        1,
        "use --max-requests-jitter N",
    ),
    (
        ("--use-colors", "--no-use-colors"),
        0,
        "log lines are plain text; for colours, give --log-config with a formatter of your own",
    ),
    (("--http2",), 0, "workers speak HTTP/1.1; terminate HTTP/2 at nginx or HAProxy in front"),
    (
        ("--access-logformat",),
        1,
        "access lines are each framework's own; give --log-config to format or route them",
    ),
    (
        ("--ssl-version", "--ssl-cert-reqs", "--ssl-ca-certs", "--ssl-ciphers", "--ciphers", "--ca-certs"),
        1,
        "only --certfile/--keyfile/--keyfile-password are taken; for more TLS settings terminate TLS at the proxy",
    ),
    (("--reuse-port",), 0, "sticky-server sets up SO_REUSEPORT itself on the kernel path (--steering)"),
    (("--worker-tmp-dir",), 1, "the heartbeat goes over each worker's control socket; there is no file to place"),
    (
        ("--statsd-host", "--statsd-prefix", "--dogstatsd-tags"),
        1,
        "use --metrics HOST:PORT (Prometheus /metrics and JSON /stats)",
    ),
    (("--capture-output",), 0, "the workers' standard output and error are the master's already"),
    (("--paste",), 1, "give the app as module:name (PasteDeploy is not read)"),
]


class UsageError(Exception):
    """A mistake in the command line, the config file or the environment: reported as argparse does, exit 2."""


def _at_least(minimum: int, name: str) -> Callable[[str], int]:
    def convert(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise ValueError(text)
        return value

    convert.__name__ = name  # what argparse says is invalid
    return convert


_positive_int = _at_least(1, "positive whole number")


def _backlog(text: str) -> int:
    return check_count("--backlog", int(text), minimum=1, maximum=MAX_BACKLOG)


_backlog.__name__ = f"backlog (1 to {MAX_BACKLOG})"
_whole = _at_least(0, "whole number")


def _seconds(text: str) -> float:
    return check_seconds("a duration", float(text), zero_allowed=True)


def _umask(text: str) -> int:
    """gunicorn's --umask: octal when it starts with 0 (``007``), else any int literal (``0o007``, ``18``)."""
    value = int(text, 8) if len(text) > 1 and text.startswith("0") and text.isdigit() else int(text, 0)
    if not 0 <= value <= 0o777:
        raise ValueError(text)
    return value


def _env_pair(text: str) -> list[str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"-e {text!r} is not NAME=VALUE")
    return [name, value]


_umask.__name__ = "umask (e.g. 007 or 0o007)"


def _bind(text: str) -> str:
    try:
        parse_bind(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _header(text: str) -> list[str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--header {text!r} is not NAME:VALUE")
    return [name.strip(), value.strip()]


_seconds.__name__ = "number of seconds"


class _Parser(argparse.ArgumentParser):
    """argparse, with errors in two lines (a short usage and the error) and a guess at a mistyped option."""

    def format_usage(self) -> str:
        return f"usage: {self.prog} [OPTIONS] TARGET ('{self.prog} --help' lists every option)\n"

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            message += _did_you_mean(message.split(":", 1)[1].split(), self._option_string_actions)
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _did_you_mean(words: Sequence[str], options: Iterable[str]) -> str:
    known = sorted(options)
    guesses = []
    for word in words:
        if word.startswith("-"):
            close = difflib.get_close_matches(word.partition("=")[0], known, n=1, cutoff=0.75)
            guesses.extend(close)
    return f" (did you mean {' and '.join(guesses)}?)" if guesses else ""


class _Refuse(argparse.Action):
    """An option of uvicorn's or gunicorn's with no meaning here: the error says why."""

    def __init__(self, option_strings: Sequence[str], dest: str, why: str = "", **kwargs: Any) -> None:
        self.why = why
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: str | None = None) -> None:
        parser.error(f"{option} does not apply to sticky-server: {self.why}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sticky-server",
        allow_abbrev=False,  # --worker is not --workers (nor --worker-class)
        description="Serve TARGET from several worker processes, each client always on the same worker.",
        epilog="Settings come from the command line, then -c FILE, then STICKY_SERVER_<OPTION> variables "
        "(e.g. STICKY_SERVER_WORKERS=4; WEB_CONCURRENCY also sets --workers). "
        "'sticky-server status' prints a running master's stats.",
    )
    parser.add_argument("--version", action="version", version=f"sticky-server {__version__}")
    parser.add_argument(
        "target",
        metavar="TARGET",
        help="module:name of an app (ASGI, WSGI, aiohttp, tornado; its kind is detected), "
        "a worker class or a worker factory",
    )

    app = parser.add_argument_group("the app")
    kind = app.add_mutually_exclusive_group()
    for name, what in KINDS.items():
        kind.add_argument(f"--{name}", dest="kind", action="store_const", const=name, help=f"TARGET is {what}")
    app.add_argument("--factory", action="store_true", help="TARGET is a function that returns the app")
    app.add_argument("--app-dir", metavar="DIR", help="import TARGET from this folder (default: the current one)")
    app.add_argument("--chdir", metavar="DIR", help="change to this folder before importing TARGET")
    app.add_argument("--env-file", metavar="FILE", help="set environment variables from this .env file")
    app.add_argument(
        "-e", "--env", action="append", type=_env_pair, metavar="NAME=VALUE", help="set an environment variable; repeat"
    )
    app.add_argument(
        "--preload", action="store_true", help="import TARGET in the master too (default: only workers import it)"
    )
    app.add_argument("--reload", action="store_true", help="development: reload the workers when a file changes")
    app.add_argument(
        "--reload-dir", action="append", metavar="DIR", help="watch this folder for --reload (default: the app's)"
    )
    app.add_argument(
        "--reload-include", action="append", metavar="GLOB", help="also reload when files matching GLOB change"
    )
    app.add_argument("--reload-exclude", action="append", metavar="GLOB", help="ignore files matching GLOB")

    bind = parser.add_argument_group("where to listen")
    bind.add_argument(
        "-b",
        "--bind",
        action="append",
        metavar="ADDRESS",
        type=_bind,
        help=f"HOST:PORT, [IPV6]:PORT, :PORT, unix:/PATH or fd://N; repeat for several (default: {DEFAULT_BIND})",
    )
    bind.add_argument("--host", help=f"listen on this address (with --port; default {DEFAULT_HOST})")
    bind.add_argument("--port", type=_whole, help=f"listen on this port (with --host; default {DEFAULT_PORT})")
    bind.add_argument("--uds", metavar="PATH", help="listen on this Unix socket")
    bind.add_argument("--fd", type=_whole, metavar="N", help="listen on the socket inherited as descriptor N")
    bind.add_argument("--backlog", type=_backlog, metavar="N", help="listen backlog (default: 4096)")
    bind.add_argument(
        "--umask",
        type=_umask,
        metavar="MASK",
        help="the processes' umask, e.g. 007 or 0o007; Unix sockets get mode 0o666 less it (default: 0o666)",
    )

    workers = parser.add_argument_group("workers")
    workers.add_argument(
        "-w",
        "--workers",
        type=_positive_int,
        metavar="N",
        help="worker processes (default: $WEB_CONCURRENCY, else one per CPU)",
    )
    workers.add_argument(
        "--balancer",
        default="ip-hash",
        metavar="NAME",
        help=f"{'|'.join(BALANCERS)} or module:Class (default: ip-hash)",
    )
    workers.add_argument(
        "--steering",
        choices=STEERINGS,
        default="auto",
        help="who puts each connection on its worker: kernel (Linux, ip-hash, TCP: workers accept their own), "
        "master (it accepts and hands off), auto (the kernel where it can; default)",
    )
    workers.add_argument(
        "--route-by",
        default="ip",
        metavar="KEY",
        help="what keeps a client on its worker: ip (default), engineio (socket.io's session id), cookie:NAME, "
        "header:NAME, query:NAME or path:N (HTTP only; new sessions spread by load)",
    )
    workers.add_argument(
        "--session-load-factor",
        type=float,
        default=DEFAULT_LOAD_FACTOR,
        metavar="E",
        help="with --route-by: a new session passes over a worker holding more than 1+E times the average "
        "(default: 0.25)",
    )
    workers.add_argument(
        "--graceful-timeout",
        "--timeout-graceful-shutdown",
        type=_seconds,
        default=DEFAULT_GRACEFUL_TIMEOUT,
        metavar="SECONDS",
        help="time workers get to finish when stopped or replaced (default: 30)",
    )
    workers.add_argument(
        "-t",
        "--timeout",
        "--timeout-worker-healthcheck",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="a worker silent this long is replaced; 0 turns the heartbeat off (default: 30)",
    )
    workers.add_argument(
        "--max-requests",
        "--limit-max-requests",
        type=_positive_int,
        metavar="N",
        help="replace a worker after it took N connections (a connection, not a request: see the README)",
    )
    workers.add_argument(
        "--max-requests-jitter", type=_whole, metavar="N", help="add up to N at random per worker (default: 10%%)"
    )
    workers.add_argument(
        "--worker-connections",
        type=_positive_int,
        metavar="N",
        help="WSGI: connections each worker serves at once, a thread each (default: 1000)",
    )
    workers.add_argument("-u", "--user", help="run the workers as this user")
    workers.add_argument("-g", "--group", help="run the workers as this group")

    proxy = parser.add_argument_group("behind a proxy")
    proxy.add_argument("--proxy-protocol", action="store_true", help="trusted peers send a PROXY v1/v2 header")
    proxy.add_argument("--forwarded-header", metavar="NAME", help="route by this header: x-forwarded-for|forwarded")
    proxy.add_argument(
        "--proxy-headers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="route by X-Forwarded-For from trusted proxies (as --forwarded-header x-forwarded-for); "
        "default: on for Unix sockets (their only peer is a proxy) and with --forwarded-allow-ips",
    )
    proxy.add_argument(
        "--trusted-proxy",
        action="append",
        metavar="ADDRESS",
        help="an address or network whose headers are believed; repeat for several (default: loopback)",
    )
    proxy.add_argument(
        "--forwarded-allow-ips",
        metavar="LIST",
        help="comma-separated trusted proxies, as uvicorn and gunicorn take them ('*': all)",
    )

    tls = parser.add_argument_group("TLS")
    tls.add_argument("--certfile", "--ssl-certfile", metavar="FILE", help="certificate (PEM); needs --keyfile")
    tls.add_argument("--keyfile", "--ssl-keyfile", metavar="FILE", help="private key (PEM)")
    tls.add_argument(
        "--keyfile-password", "--ssl-keyfile-password", metavar="PASSWORD", help="the private key's password"
    )

    logs = parser.add_argument_group("logging and operations")
    logs.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=["trace", "debug", "info", "warning", "error", "critical"],
        help="(default: info; trace is debug)",
    )
    logs.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one line per request at INFO (default: on)",
    )
    logs.add_argument("--log-config", metavar="FILE", help="logging configuration: dictConfig JSON or YAML, or INI")
    logs.add_argument(
        "--access-logfile", metavar="FILE", help="write access lines to FILE ('-': standard output); turns them on"
    )
    logs.add_argument(
        "--error-logfile", "--log-file", metavar="FILE", help="write the log to FILE ('-': standard error, the default)"
    )
    logs.add_argument("-n", "--name", metavar="NAME", help="the process title's name (default: TARGET)")
    logs.add_argument("-p", "--pid", metavar="FILE", help="write the master's pid here; removed at exit")
    logs.add_argument(
        "--metrics", metavar="HOST:PORT", type=_bind, help="serve /metrics (Prometheus) and /stats (JSON) there"
    )
    logs.add_argument("-c", "--config", metavar="FILE", help="read settings from this TOML or Python file")
    logs.add_argument("--check-config", action="store_true", help="print the settings in effect and exit")

    uvicorn = parser.add_argument_group("uvicorn's options, for ASGI apps")
    uvicorn.add_argument("--root-path", metavar="PATH", help="the ASGI root_path (behind a proxy on a sub-path)")
    uvicorn.add_argument(
        "--timeout-keep-alive",
        "--keep-alive",
        type=_seconds,
        metavar="SECONDS",
        help="close a keep-alive connection idle this long (ASGI, and WSGI's keepalive; default: 5)",
    )
    uvicorn.add_argument("--limit-concurrency", type=_positive_int, metavar="N", help="answer 503 beyond N at once")
    wsgi = parser.add_argument_group("gunicorn's limits, for WSGI apps")
    wsgi.add_argument("--limit-request-line", type=_whole, metavar="BYTES", help="(default: 4094; 0: no limit)")
    wsgi.add_argument("--limit-request-fields", type=_whole, metavar="N", help="(default: 100)")
    wsgi.add_argument(
        "--limit-request-field_size", "--limit-request-field-size", type=_whole, metavar="BYTES", help="(default: 8190)"
    )
    wsgi.add_argument(
        "--max-body-size", type=_whole, metavar="BYTES", help="answer 413 to a larger request body (default: no limit)"
    )
    uvicorn.add_argument("--ws", choices=["auto", "none", "websockets", "websockets-sansio", "wsproto"])
    uvicorn.add_argument("--ws-max-size", type=_positive_int, metavar="BYTES")
    uvicorn.add_argument("--ws-max-queue", type=_positive_int, metavar="N")
    uvicorn.add_argument("--ws-ping-interval", type=_seconds, metavar="SECONDS")
    uvicorn.add_argument("--ws-ping-timeout", type=_seconds, metavar="SECONDS")
    uvicorn.add_argument("--ws-per-message-deflate", action=argparse.BooleanOptionalAction, default=None)
    uvicorn.add_argument("--lifespan", choices=["auto", "on", "off"])
    uvicorn.add_argument("--http", choices=["auto", "h11", "httptools"])
    uvicorn.add_argument("--interface", choices=["auto", "asgi3", "asgi2", "wsgi"])
    uvicorn.add_argument(
        "--loop",
        choices=["auto", "asyncio", "uvloop"],
        default="auto",
        help="(auto: uvloop when installed, except behind a proxy setting or on a dual-stack bind)",
    )
    uvicorn.add_argument("--h11-max-incomplete-event-size", type=_positive_int, metavar="BYTES")
    uvicorn.add_argument(
        "--header", action="append", type=_header, metavar="NAME:VALUE", help="a response header; repeat"
    )
    uvicorn.add_argument("--server-header", action=argparse.BooleanOptionalAction, default=None)
    uvicorn.add_argument("--date-header", action=argparse.BooleanOptionalAction, default=None)

    refused = parser.add_argument_group("not here (each one says why)")
    for flags, nargs, why in REFUSED:
        refused.add_argument(*flags, action=_Refuse, nargs=nargs or 0, why=why, help=argparse.SUPPRESS)
    return parser


def refused_dests() -> set[str]:
    """The argparse destinations of the refused options (never settings in effect)."""
    return {action.dest for action in build_parser()._actions if isinstance(action, _Refuse)}


def settable_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The options a config file or the environment may set, by dest."""
    return {
        action.dest: action
        for action in parser._actions
        if action.option_strings
        and action.dest not in ("help", "version", "config", "check_config")
        and not isinstance(action, _Refuse)
    }


def check_bind(text: str) -> str:
    """``text`` if it is a valid bind; the argparse error naming the forms if not."""
    return _bind(text)
