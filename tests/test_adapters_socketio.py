"""python-socketio's client managers over the sticky channel: which server they serve, and which StickyServer."""

from __future__ import annotations

from typing import Any

import pytest
from pytest_mock import MockerFixture

socketio = pytest.importorskip("socketio")

from sticky_server import StickyServer  # noqa: E402 (after the skip when python-socketio is missing)
from sticky_server.adapters.socketio import StickyManager, SyncStickyManager  # noqa: E402


class FakeWorkerServer:
    """Stands in for the StickyServer of a worker process: what the managers use of it."""

    is_master = False

    def __init__(self) -> None:
        self.handlers: list[Any] = []
        self.published: list[Any] = []

    def on_message(self, handler: Any) -> None:
        self.handlers.append(handler)

    def publish(self, message: Any, include_self: bool = False) -> None:
        self.published.append((message, include_self))


@pytest.fixture
def worker_server(mocker: MockerFixture) -> FakeWorkerServer:
    server = FakeWorkerServer()
    mocker.patch.object(StickyServer, "_current", server)
    return server


def test_each_manager_serves_its_own_kind_of_server_and_names_the_other(worker_server: FakeWorkerServer) -> None:
    socketio.AsyncServer(client_manager=StickyManager())
    socketio.Server(client_manager=SyncStickyManager())
    with pytest.raises(TypeError, match=r"socketio\.Server and Flask-SocketIO need SyncStickyManager"):
        socketio.Server(client_manager=StickyManager())
    with pytest.raises(TypeError, match=r"socketio\.AsyncServer needs StickyManager"):
        socketio.AsyncServer(client_manager=SyncStickyManager())
    assert len(worker_server.handlers) == 4  # each listens on the channel from the start


def test_the_sync_manager_publishes_to_every_worker_and_queues_what_arrives(worker_server: FakeWorkerServer) -> None:
    manager = SyncStickyManager(channel="chat")
    manager._publish({"method": "emit"})
    assert worker_server.published == [({"socketio": "chat", "data": {"method": "emit"}}, True)]
    handler = worker_server.handlers[0]
    handler(1, {"socketio": "other", "data": "not ours"})
    handler(1, {"socketio": "chat", "data": "ours"})
    assert next(manager._listen()) == "ours"


def test_a_server_that_is_not_this_processs_is_refused(worker_server: FakeWorkerServer) -> None:
    other: Any = FakeWorkerServer()
    with pytest.raises(ValueError, match="leave the argument out"):
        SyncStickyManager(other)
