"""Telling an app's kind without calling it, as the command does when no kind flag is given."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from sticky_server.cli.options import UsageError
from sticky_server.cli.settings import parse_settings
from sticky_server.cli.target import detect_kind, make_worker


def wsgi_function(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    return []


async def asgi_function(scope: Any, receive: Any, send: Any) -> None:
    pass


class LineWorker:
    def __init__(self, sticky: Any) -> None:
        self.sticky = sticky

    def add_connection(self, sock: Any) -> None:
        pass


def factory() -> Any:
    return wsgi_function


def test_plain_functions_and_workers() -> None:
    assert detect_kind(wsgi_function) == "wsgi"
    assert detect_kind(asgi_function) == "asgi"
    assert detect_kind(LineWorker) == "factory"
    assert detect_kind(LineWorker(None)) == "worker"
    assert detect_kind(factory) == "factory"
    assert detect_kind(lambda sticky: LineWorker(sticky)) == "factory"


def test_the_frameworks_apps() -> None:
    flask = pytest.importorskip("flask")
    fastapi = pytest.importorskip("fastapi")
    from aiohttp import web
    from tornado import web as tornado_web

    assert detect_kind(flask.Flask(__name__)) == "wsgi"
    assert detect_kind(fastapi.FastAPI()) == "asgi"
    assert detect_kind(web.Application()) == "aiohttp"
    assert detect_kind(tornado_web.Application()) == "tornado"


def test_python_socketio_apps() -> None:
    socketio = pytest.importorskip("socketio")
    assert detect_kind(socketio.ASGIApp(socketio.AsyncServer(async_mode="asgi"))) == "asgi"
    assert detect_kind(socketio.WSGIApp(socketio.Server(async_mode="threading"))) == "wsgi"
    # Django's handlers need its settings: tests/integration/test_frameworks.py runs both, undeclared.


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ({"a": 1}, "TARGET is a dict, not an app, a worker or a factory"),
        (argparse.Namespace, "TARGET is the class Namespace, which has no add_connection"),
        (lambda a, b, c, d: None, "cannot tell what kind of app TARGET is"),
    ],
)
def test_what_cannot_be_told_names_the_flags(value: Any, says: str) -> None:
    with pytest.raises(UsageError, match=says) as error:
        detect_kind(value)
    assert "--asgi, --wsgi, --aiohttp or --tornado" in str(error.value)


def test_uvicorns_options_are_for_asgi_apps_only() -> None:
    args = parse_settings(["m:app", "--root-path", "/api"], {})
    with pytest.raises(UsageError, match="--root-path: uvicorn's options apply to ASGI apps, and TARGET is a WSGI"):
        make_worker(args, wsgi_function, sticky=None)  # type: ignore[arg-type]


def test_uvicorns_options_reach_the_asgi_worker() -> None:
    pytest.importorskip("uvicorn")
    argv = ["m:app", "--root-path", "/api", "--timeout-keep-alive", "9", "--header", "X-Served-By: sticky"]
    worker = make_worker(parse_settings(argv, {}), asgi_function, sticky=None)  # type: ignore[arg-type]
    config = worker.config
    assert (config.root_path, config.timeout_keep_alive) == ("/api", 9.0)
    assert ["X-Served-By", "sticky"] in [list(pair) for pair in config.headers]


def test_the_wsgi_worker_takes_keep_alive_from_the_habit() -> None:
    pytest.importorskip("gunicorn")
    worker = make_worker(parse_settings(["m:app", "--keep-alive", "3"], {}), wsgi_function, sticky=None)  # type: ignore[arg-type]
    assert worker.server.keepalive == 3.0


def test_a_factory_flag_calls_the_target_and_looks_again() -> None:
    pytest.importorskip("gunicorn")
    from sticky_server.adapters.wsgi import WSGIWorker

    worker = make_worker(parse_settings(["m:factory", "--factory"], {}), factory, sticky=None)  # type: ignore[arg-type]
    assert isinstance(worker, WSGIWorker)
