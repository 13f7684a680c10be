"""Where each setting comes from, and what the habits' options mean.

Precedence, highest first: the command line; the config file (``-c FILE``: TOML, or a
Python file as gunicorn's ``-c`` takes); the environment (``STICKY_SERVER_<OPTION>``,
and ``WEB_CONCURRENCY`` for ``--workers``); the defaults. Every value, wherever it
comes from, is checked as the command line checks it (``options``).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config_file import ConfigFileError, load_config_file
from .options import (
    DEFAULT_BIND,
    DEFAULT_HOST,
    DEFAULT_PORT,
    ENV_PREFIX,
    KINDS,
    UsageError,
    build_parser,
    check_bind,
    refused_dests,
    settable_actions,
)

__all__ = ["effective_settings", "format_settings", "in_cli_terms", "parse_settings", "systemd_binds"]


def _coerce(action: argparse.Action, value: Any, where: str) -> Any:
    """``value`` checked as the command line would check it (a string, or a TOML/Python value)."""
    long_flags = [flag for flag in action.option_strings if flag.startswith("--")]
    flag = long_flags[0] if action.dest != "kind" else "--asgi/--wsgi/--aiohttp/--tornado"
    try:
        if action.dest == "kind":
            if value not in KINDS:
                raise ValueError(value)
            return value
        if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
                raise ValueError(value)
            return text in ("1", "true", "yes", "on")
        if isinstance(action, argparse._AppendAction):
            items = value.split(",") if isinstance(value, str) else list(value)
            return [action.type(str(item)) if action.type else str(item) for item in items if item != ""]  # type: ignore[operator]
        text = str(value)
        converted = action.type(text) if action.type else text  # type: ignore[operator]
        if action.choices is not None and converted not in action.choices:
            raise ValueError(value)
        return converted
    except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
        raise UsageError(f"{where} is not a valid {flag}: {exc}") from None


def _file_defaults(parser: argparse.ArgumentParser, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config file's settings, checked as the command line checks them, and its gunicorn hooks."""
    settable = settable_actions(parser)
    try:
        loaded = load_config_file(path, settable)
    except ConfigFileError as exc:
        raise UsageError(str(exc)) from None
    settings = {
        name: _coerce(settable[name], value, f"{name} = {value!r} in {path}") for name, value in loaded.settings.items()
    }
    return settings, loaded.hooks


def _environment_defaults(parser: argparse.ArgumentParser, environ: dict[str, str]) -> dict[str, Any]:
    settable = settable_actions(parser)
    settings: dict[str, Any] = {}
    concurrency = environ.get("WEB_CONCURRENCY")
    if concurrency:
        settings["workers"] = _coerce(settable["workers"], concurrency, f"WEB_CONCURRENCY={concurrency!r}")
    for dest, action in settable.items():
        name = ENV_PREFIX + dest.upper()
        if name in environ:
            settings[dest] = _coerce(action, environ[name], f"environment variable {name}={environ[name]!r}")
    return settings


def parse_settings(argv: Sequence[str], environ: dict[str, str]) -> argparse.Namespace:
    """The settings in effect: the command line over the config file over the environment over the defaults.

    A mistake anywhere is a usage error (exit 2) naming where it was.
    """
    parser = build_parser()
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("-c", "--config")
    known, _ = early.parse_known_args(argv)
    config = known.config or environ.get(ENV_PREFIX + "CONFIG")
    hooks: dict[str, Any] = {}
    try:
        layered = _environment_defaults(parser, environ)
        if config:
            from_file, hooks = _file_defaults(parser, Path(config))
            layered.update(from_file)
    except UsageError as exc:
        parser.error(str(exc))
    # Repeatable options from a file or the environment apply only when the command line gives none
    # (argparse would add the command line's to them).
    settable = settable_actions(parser)
    repeated = {dest: layered.pop(dest) for dest in list(layered) if isinstance(settable[dest], argparse._AppendAction)}
    parser.set_defaults(**layered)
    args = parser.parse_args(argv)
    for dest, value in repeated.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    args.config = config
    args.hooks = hooks
    try:
        _resolve(args, environ)
    except UsageError as exc:
        parser.error(str(exc))
    return args


def _resolve(args: argparse.Namespace, environ: dict[str, str]) -> None:
    """Turn the habits' options into the settings they mean (binds, proxies, log level)."""
    module, sep, name = args.target.partition(":")
    if not sep or not module or not name:
        raise UsageError(f"TARGET must be module:name (e.g. main:app), got {args.target!r}")
    binds = list(args.bind or [])
    if args.host is not None or args.port is not None:
        host = args.host if args.host is not None else DEFAULT_HOST
        port = args.port if args.port is not None else DEFAULT_PORT
        binds.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if args.uds:
        binds.append(f"unix:{args.uds}")
    if args.fd is not None:
        binds.append(f"fd://{args.fd}")
    if not binds:
        binds = systemd_binds(environ) or [DEFAULT_BIND]
    for text in binds:
        check_bind(text)
    args.bind = binds
    _resolve_proxies(args)
    if args.log_level == "trace":
        args.log_level = "debug"


def _resolve_proxies(args: argparse.Namespace) -> None:
    """The proxy options as uvicorn users expect them, each mistake said in the command line's terms.

    ``--forwarded-allow-ips`` alone turns ``--proxy-headers`` on (uvicorn's proxy headers
    are on by default); Unix sockets route by X-Forwarded-For unless told otherwise, with
    connections that send no HTTP request routed as they come (``forwarded_header_fallback``).
    """
    args.forwarded_header_fallback = False
    if args.proxy_headers:
        if args.forwarded_header not in (None, "x-forwarded-for"):
            raise UsageError("--proxy-headers means --forwarded-header x-forwarded-for; give one of them")
        if args.proxy_protocol:
            raise UsageError("--proxy-headers and --proxy-protocol exclude each other: give the one your proxy sends")
        args.forwarded_header = "x-forwarded-for"
    told = bool(args.forwarded_header or args.proxy_protocol)
    if args.forwarded_header and args.proxy_protocol:
        raise UsageError("--forwarded-header and --proxy-protocol exclude each other: give the one your proxy sends")
    if args.forwarded_allow_ips:
        args.trusted_proxy = [*(args.trusted_proxy or []), *_split(args.forwarded_allow_ips)]
        if not told and args.proxy_headers is None:
            args.forwarded_header, told = "x-forwarded-for", True
    if args.trusted_proxy and not told:
        raise UsageError(
            "--trusted-proxy / --forwarded-allow-ips name the proxies whose headers are believed, and no header "
            "is read: add --proxy-headers (X-Forwarded-For), --forwarded-header forwarded, or --proxy-protocol"
        )
    if not told and args.proxy_headers is None and any(bind.startswith("unix:") for bind in args.bind):
        args.forwarded_header, args.forwarded_header_fallback = "x-forwarded-for", True


# StickyServer's keyword arguments, as the command line spells them (for its errors).
_FLAGS = {
    "forwarded_header_fallback": "--proxy-headers",
    "forwarded_header": "--forwarded-header",
    "trusted_proxies": "--trusted-proxy",
    "proxy_protocol": "--proxy-protocol",
    "graceful_timeout": "--graceful-timeout",
    "max_connections_per_worker": "--max-requests",
    "max_connections_jitter": "--max-requests-jitter",
    "unix_socket_mode": "--umask",
    "session_load_factor": "--session-load-factor",
    "route_by": "--route-by",
    "workers": "--workers",
    "timeout": "--timeout",
    "backlog": "--backlog",
    "balancer": "--balancer",
    "steering": "--steering",
    "loop": "--loop",
    "user": "--user",
    "group": "--group",
}


def in_cli_terms(message: str) -> str:
    """A ``StickyServer`` error as the command line would say it: flags, not keyword arguments."""
    message = re.sub(r"\bsteering='(\w+)'", r"--steering \1", message)
    message = message.replace("Use --steering 'auto' or 'master'", "use --steering auto or master")
    message = message.replace("Use --steering auto or 'master'", "use --steering auto or master")
    for name, flag in _FLAGS.items():
        if "_" in name:
            message = re.sub(rf"\b{name}\b(=True)?", flag, message)
        elif message.startswith(f"{name} "):
            message = flag + message[len(name) :]
    return message


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def systemd_binds(environ: dict[str, str], pid: int | None = None) -> list[str]:
    """``fd://N`` for each socket systemd passed this process (``LISTEN_FDS``, ``LISTEN_PID``), else []."""
    count, owner = environ.get("LISTEN_FDS"), environ.get("LISTEN_PID")
    if not count or not count.isdigit() or owner != str(pid if pid is not None else os.getpid()):
        return []
    first = 3  # SD_LISTEN_FDS_START
    return [f"fd://{fd}" for fd in range(first, first + int(count))]


# --- --check-config ----------------------------------------------------------------------

_SECRET = ("keyfile_password",)
_NOT_SHOWN = ("check_config", "host", "port", "uds", "fd", "proxy_headers", "forwarded_allow_ips")


def effective_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings in effect, by option name, as ``--check-config`` prints them (never a refused option)."""
    refused = refused_dests()
    shown = {**vars(args), "hooks": sorted(args.hooks) or None} if hasattr(args, "hooks") else vars(args)
    return {
        name: "(given)" if name in _SECRET else value
        for name, value in sorted(shown.items())
        if name not in _NOT_SHOWN and name not in refused and not name.startswith("_") and value is not None
    }


def format_settings(args: argparse.Namespace, describe: Callable[[Any], str] = repr) -> str:
    settings = effective_settings(args)
    width = max(len(name) for name in settings)
    return "".join(f"{name.replace('_', '-'):<{width}}  {describe(value)}\n" for name, value in settings.items())
