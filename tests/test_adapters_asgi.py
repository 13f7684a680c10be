"""The ASGI adapter: uvicorn's per-connection options pass; those that assume uvicorn owns the process do not."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("uvicorn")

from sticky_server.adapters.asgi import PROCESS_OPTIONS, ASGIWorker


async def app(scope: object, receive: object, send: object) -> None:
    """An ASGI app that is never called here."""


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ("limit_max_requests", "max_connections_per_worker"),
        ("workers", "StickyServer.workers=N. or --workers"),
        ("reload", "SIGHUP"),
        ("port", "the master listens"),
    ],
)
def test_options_that_assume_uvicorn_owns_the_process_are_refused_naming_the_replacement(
    option: str, says: str
) -> None:
    with pytest.raises(TypeError, match=f"{option}: .*{says}"):
        options: dict[str, Any] = {option: 1}
        ASGIWorker(app, **options)


def test_per_connection_options_reach_uvicorns_config() -> None:
    worker = ASGIWorker(app, root_path="/api", timeout_keep_alive=7, limit_concurrency=50, ws_max_size=1000)
    config = worker.config
    assert (config.root_path, config.timeout_keep_alive, config.limit_concurrency, config.ws_max_size) == (
        "/api",
        7,
        50,
        1000,
    )
    assert "root_path" not in PROCESS_OPTIONS
