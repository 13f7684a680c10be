"""TARGET: import it, tell what kind of thing it is, and make the worker that serves it.

Kinds are told apart the way uvicorn tells ASGI from WSGI, by looking, never by
calling the app:

- a class or object with ``add_connection``: a worker (a class is made as a factory is);
- an aiohttp ``web.Application`` or a tornado ``web.Application`` (by type, when that
  framework is already imported, as the app's module imports it);
- an ``async def`` callable, or an object whose ``__call__`` is ``async def``: ASGI;
- a callable taking ``(environ, start_response)``: WSGI;
- a callable taking nothing, or only the ``StickyServer``: a worker factory (its
  result is looked at again, so a factory may return an app).

``--factory`` says TARGET returns the app (uvicorn's flag); the kind flags override
the detection.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import ssl
import sys
import traceback
from typing import Any

from ..server import StickyServer
from .options import KINDS, UVICORN_OPTIONS, UsageError

__all__ = ["detect_kind", "import_target", "make_worker", "print_user_error"]

_KIND_FLAGS = "--asgi, --wsgi, --aiohttp or --tornado"
_WSGI_OPTIONS = (
    "worker_connections",
    "limit_request_line",
    "limit_request_fields",
    "limit_request_field_size",
    "max_body_size",
)


def import_target(target: str, app_dir: str | None = None) -> Any:
    """The object ``module:name`` names. UsageError for a malformed TARGET or a missing name."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise UsageError(f"TARGET must be module:name (e.g. main:app), got {target!r}")
    folder = os.path.abspath(app_dir) if app_dir else os.getcwd()
    if folder not in sys.path:
        sys.path.insert(0, folder)  # as uvicorn's --app-dir and gunicorn's cwd: the app's own modules
    module = importlib.import_module(module_name)
    value: Any = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no {attribute!r} (from TARGET {target!r})") from None
    return value


def _is_instance_of(value: object, module: str, name: str) -> bool:
    loaded = sys.modules.get(module)
    kind = getattr(loaded, name, None) if loaded is not None else None
    return isinstance(kind, type) and isinstance(value, kind)


def _takes(function: Any, count: int) -> bool:
    try:
        inspect.signature(function).bind(*range(count))
    except (TypeError, ValueError):
        return False
    return True


def detect_kind(value: Any) -> str:
    """``"worker"``, ``"factory"``, or one of ``KINDS``; UsageError with the flag to add when it cannot tell."""
    if hasattr(value, "add_connection"):
        return "factory" if inspect.isclass(value) else "worker"
    if _is_instance_of(value, "aiohttp.web", "Application"):
        return "aiohttp"
    if _is_instance_of(value, "tornado.web", "Application"):
        return "tornado"
    if inspect.isclass(value):
        raise UsageError(
            f"TARGET is the class {value.__name__}, which has no add_connection: give the app object "
            f"(e.g. module:app), a worker class, or add {_KIND_FLAGS}"
        )
    if not callable(value):
        raise UsageError(
            f"TARGET is a {type(value).__name__}, not an app, a worker or a factory; point it at the app "
            f"(e.g. module:app) or add {_KIND_FLAGS}"
        )
    call = value if inspect.isfunction(value) or inspect.ismethod(value) else getattr(value, "__call__", value)  # noqa: B004
    if inspect.iscoroutinefunction(call):
        return "asgi"
    if _takes(value, 2) and not _takes(value, 1):
        return "wsgi"
    if _takes(value, 0) or _takes(value, 1):
        return "factory"
    raise UsageError(f"cannot tell what kind of app TARGET is ({type(value).__name__}); add {_KIND_FLAGS}")


def _tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.certfile and not args.keyfile:
        return None
    if not (args.certfile and args.keyfile):
        raise UsageError("--certfile and --keyfile go together; give both")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.certfile, args.keyfile, password=args.keyfile_password)
    return context


def check_tls(args: argparse.Namespace) -> None:
    """A bad certificate or key fails here, in the master, before any worker starts."""
    _tls(args)


def uvicorn_options(args: argparse.Namespace) -> dict[str, Any]:
    """The uvicorn options given on the command line (or in the file, or the environment)."""
    options = {
        keyword: getattr(args, dest) for dest, keyword in UVICORN_OPTIONS.items() if getattr(args, dest) is not None
    }
    if "headers" in options:
        options["headers"] = [tuple(pair) for pair in options["headers"]]
    return options


def make_worker(args: argparse.Namespace, target: Any, sticky: StickyServer) -> Any:
    """The worker serving ``target`` (in a worker process)."""
    if args.factory:
        target = target()
    kind = args.kind or detect_kind(target)
    while kind == "factory":
        target = target(sticky) if _takes(target, 1) and not _takes(target, 0) else target()
        kind = detect_kind(target)
    given = uvicorn_options(args)
    wsgi_only = [name for name in _WSGI_OPTIONS if getattr(args, name, None) is not None]
    if wsgi_only and kind != "wsgi":
        flags = ", ".join("--" + name.replace("_", "-") for name in wsgi_only)
        raise UsageError(f"{flags}: gunicorn's limits apply to WSGI apps, and TARGET is {KINDS.get(kind, kind)}")
    if kind != "asgi":
        wsgi_keepalive = kind == "wsgi" and set(given) == {"timeout_keep_alive"}
        if given and not wsgi_keepalive:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise UsageError(f"{flags}: uvicorn's options apply to ASGI apps, and TARGET is {KINDS.get(kind, kind)}")
    tls = _tls(args)
    if kind == "worker":
        return target
    if kind == "asgi":
        from ..adapters.asgi import ASGIWorker

        return ASGIWorker(target, ssl_context=tls, log_config=None, access_log=args.access_log, **given)
    if kind == "aiohttp":
        from ..adapters.aiohttp import AiohttpWorker

        return AiohttpWorker(target, ssl_context=tls, **({} if args.access_log else {"access_log": None}))
    if kind == "wsgi":
        from ..adapters.wsgi import DEFAULT_KEEPALIVE, WSGIWorker

        keepalive = args.timeout_keep_alive or DEFAULT_KEEPALIVE
        limits = {
            name: getattr(args, name)
            for name in ("limit_request_line", "limit_request_fields", "limit_request_field_size", "max_body_size")
            if getattr(args, name) is not None
        }
        if args.worker_connections is not None:
            limits["max_connections"] = args.worker_connections
        return WSGIWorker(target, ssl_context=tls, keepalive=keepalive, access_log=args.access_log, **limits)
    from ..adapters.tornado import TornadoWorker

    return TornadoWorker(target, ssl_context=tls)


def print_user_error(headline: str, exc: BaseException) -> None:
    """``exc``'s traceback from the user's first frame on: our frames and importlib's say nothing to them."""
    ours = (os.path.dirname(os.path.dirname(__file__)), "<frozen importlib", os.path.dirname(importlib.__file__))
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(ours):
        tb = tb.tb_next
    print(headline, file=sys.stderr)
    traceback.print_exception(type(exc), exc, tb, file=sys.stderr)
