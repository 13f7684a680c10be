"""``-c FILE``: settings from a TOML file or a Python file, as gunicorn's ``-c`` takes.

A gunicorn config file works as it is where its settings apply here: each known
gunicorn name is taken with its meaning (``GUNICORN_NAMES``), the server hooks people
use are honoured (``HOOKS``), and everything else is refused at once, every setting
with its reason, so that nothing is dropped silently. Other module-level functions and
modules (``import multiprocessing``) are the file's own helpers and are left alone.
"""

from __future__ import annotations

import difflib
import inspect
import runpy
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["GUNICORN_NAMES", "HOOKS", "REFUSED_HOOKS", "REFUSED_NAMES", "ConfigFile", "load_config_file"]


class ConfigFileError(Exception):
    """What is wrong with a config file; ``UsageError`` in the options' terms."""


# gunicorn's names for settings that exist here under another name.
GUNICORN_NAMES = {
    "pidfile": "pid",
    "keepalive": "timeout_keep_alive",
    "loglevel": "log_level",
    "preload_app": "preload",
    "accesslog": "access_logfile",
    "errorlog": "error_logfile",
    "raw_env": "env",
    "proc_name": "name",
    "proxy_allow_ips": "trusted_proxy",
    "logconfig": "log_config",
    "logconfig_json": "log_config",
    "reload_extra_files": "reload_include",
    "limit_max_requests": "max_requests",
    "ssl_keyfile": "keyfile",
    "ssl_certfile": "certfile",
    "ssl_keyfile_password": "keyfile_password",
}

# gunicorn settings with no meaning here, and what to do instead.
_TLS = "only certfile, keyfile and keyfile_password are taken; for more TLS settings terminate TLS at the proxy"
_PARSER = "the WSGI worker uses gunicorn's parser with its defaults; a proxy in front can enforce stricter limits"
_SYSLOG = "give --log-config (logconfig) with a SysLogHandler"
_STATSD = "use --metrics HOST:PORT (Prometheus /metrics and JSON /stats)"
REFUSED_NAMES = {
    "threads": "the WSGI worker serves each connection on a thread of its own; there is no pool to size",
    "daemon": "run it in the foreground under systemd or another supervisor (see the README)",
    "spew": "not supported; run a worker under a debugger instead",
    "check_config": "give --check-config on the command line",
    "print_config": "give --check-config on the command line",
    "sendfile": "each framework decides how it sends files",
    "reuse_port": "sticky-server sets up SO_REUSEPORT itself on the kernel path (--steering)",
    "worker_tmp_dir": "the heartbeat goes over each worker's control socket; there is no file to place",
    "initgroups": "workers run with no supplementary groups (user and group only)",
    "tmp_upload_dir": "each framework decides where uploads go",
    "secure_scheme_headers": "the frameworks read X-Forwarded-Proto from trusted proxies (forwarded_allow_ips)",
    "access_log_format": "access lines are each framework's own; give --log-config to format or route them",
    "disable_redirect_access_to_syslog": _SYSLOG,
    "capture_output": "the workers' standard output and error are the master's already",
    "logger_class": "give --log-config (logconfig) to configure logging",
    "logconfig_dict": "put the dictionary in a JSON file and give it as logconfig",
    "syslog_addr": _SYSLOG,
    "syslog": _SYSLOG,
    "syslog_prefix": _SYSLOG,
    "syslog_facility": _SYSLOG,
    "enable_stdio_inheritance": "the workers' standard streams are the master's already",
    "statsd_host": _STATSD,
    "dogstatsd_tags": _STATSD,
    "statsd_prefix": _STATSD,
    "default_proc_name": "give proc_name (--name)",
    "pythonpath": "give --app-dir DIR (one folder) or set PYTHONPATH",
    "paste": "give the app as module:name (PasteDeploy is not read)",
    "raw_paste_global_conf": "give the app as module:name (PasteDeploy is not read)",
    "wsgi_app": "give the app as module:name on the command line",
    "reload_engine": "--reload uses watchfiles when installed, else polls once a second",
    "ssl_version": _TLS,
    "cert_reqs": _TLS,
    "ca_certs": _TLS,
    "suppress_ragged_eofs": _TLS,
    "do_handshake_on_connect": _TLS,
    "ciphers": _TLS,
    "permit_obsolete_folding": _PARSER,
    "strip_header_spaces": _PARSER,
    "permit_unconventional_http_method": _PARSER,
    "permit_unconventional_http_version": _PARSER,
    "casefold_http_method": _PARSER,
    "forwarder_headers": _PARSER,
    "header_map": _PARSER,
}

# worker_class values that name a kind of app this command serves itself.
_WORKER_CLASSES = {
    "sync": "wsgi",
    "gthread": "wsgi",
    "uvicorn.workers.UvicornWorker": "asgi",
    "uvicorn_worker.UvicornWorker": "asgi",
    "uvicorn.workers.UvicornH11Worker": "asgi",
    "aiohttp.GunicornWebWorker": "aiohttp",
    "aiohttp.worker.GunicornWebWorker": "aiohttp",
    "tornado": "tornado",
}

# gunicorn's server hooks honoured here: where each runs and with what (see ``hooks.py``).
HOOKS = ("on_starting", "when_ready", "post_fork", "post_worker_init", "worker_exit", "on_exit")
REFUSED_HOOKS = {
    "on_reload": "SIGHUP replaces the workers one slot at a time; use when_ready or post_worker_init",
    "pre_fork": "workers are started, not forked; use post_fork (it runs in the new worker)",
    "pre_exec": "the master is never re-executed; restart the service to upgrade",
    "pre_request": "requests are the framework's: use its middleware",
    "post_request": "requests are the framework's: use its middleware",
    "child_exit": "use worker_exit (it runs in the worker) or StickyServer.on_worker_exit",
    "worker_int": "SIGINT and SIGQUIT stop a worker quickly; use worker_exit",
    "worker_abort": "a stuck worker is killed after --timeout; use worker_exit",
    "nworkers_changed": "SIGTTIN/SIGTTOU change the workers; the stats say how many",
    "ssl_context": _TLS,
}


class ConfigFile:
    """What a config file sets: option values by dest, and the gunicorn hooks it defines."""

    def __init__(self, settings: dict[str, Any], hooks: dict[str, Callable[..., Any]]) -> None:
        self.settings = settings
        self.hooks = hooks


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Callable[..., Any]]]:
    if not path.is_file():
        raise ConfigFileError(f"-c {path}: no such file")
    if path.suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise ConfigFileError(
                    "-c FILE.toml needs Python 3.11 or the tomli package: pip install tomli"
                ) from None
        try:
            with path.open("rb") as file:
                values: dict[str, Any] = tomllib.load(file)
        except (OSError, ValueError) as exc:
            raise ConfigFileError(f"-c {path}: {exc}") from None
        table = values.get("tool", {}).get("sticky-server") if "tool" in values else None
        return (dict(table) if isinstance(table, dict) else values), {}
    if path.suffix == ".py":
        try:
            namespace = runpy.run_path(str(path))
        except Exception as exc:
            raise ConfigFileError(f"-c {path}: running it failed: {type(exc).__name__}: {exc}") from None
        settings, hooks = {}, {}
        for name, value in namespace.items():
            if name.startswith("_") or inspect.ismodule(value):
                continue
            if callable(value) and not inspect.isclass(value):
                if name in HOOKS or name in REFUSED_HOOKS:
                    hooks[name] = value
                continue  # the file's own helper function
            if isinstance(value, (str, int, float, bool, list, tuple)):
                settings[name] = value
        return settings, hooks
    raise ConfigFileError(f"-c {path}: a config file is TOML (.toml) or Python (.py)")


def load_config_file(path: Path, settable: Iterable[str]) -> ConfigFile:
    """The file's settings by dest (values unchecked) and its hooks; every problem at once in one error."""
    values, hooks = _read(path)
    known = set(settable)
    settings: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in values.items():
        name = key.replace("-", "_")
        if name == "worker_class":
            kind = _WORKER_CLASSES.get(str(value))
            if kind is None:
                problems.append(
                    f"worker_class = {value!r}: sticky-server picks the server from the app (ASGI, WSGI, aiohttp, "
                    "tornado) and runs no eventlet/gevent workers; remove it (Flask-SocketIO runs in threading mode)"
                )
            else:
                settings["kind"] = kind
            continue
        if name in REFUSED_NAMES:
            problems.append(f"{key}: {REFUSED_NAMES[name]}")
            continue
        name = GUNICORN_NAMES.get(name, name)
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known | set(GUNICORN_NAMES) | set(HOOKS)), n=1)
            hint = f" (did you mean {close[0]}?)" if close else " (settings are the options' long names)"
            problems.append(f"{key}: unknown setting{hint}")
            continue
        if name == "env" and isinstance(value, str):
            value = [value]
        if name == "env":
            value = [str(item) for item in value]
        settings[name] = value
    for name in hooks:
        if name in REFUSED_HOOKS:
            problems.append(f"{name}(): the hook does not apply to sticky-server: {REFUSED_HOOKS[name]}")
    if problems:
        raise ConfigFileError(f"-c {path}: " + "; ".join(problems))
    return ConfigFile(settings, {name: hook for name, hook in hooks.items() if name in HOOKS})
