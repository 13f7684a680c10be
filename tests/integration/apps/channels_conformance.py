"""A sticky-server of 3 workers whose worker 0 runs channels-redis's own layer tests against StickyChannelLayer.

    APP_TESTS=<folder with their test_core.py and the channels_redis shim> APP_RESULT=<junit.xml> python ...

Their layers are made in worker 0, so every send, group_send and flush goes over the
master's channel and back (the other workers hear every group message too, and hold
no member of the tests' groups). Prints ``CONFORMANCE <pytest exit code>`` when done.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

from sticky_server import AsyncWorker, StickyServer


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def run_their_tests() -> None:
    import pytest

    folder = os.environ["APP_TESTS"]
    started = os.environ["APP_RESULT"] + ".started"
    if os.path.exists(started):  # a test hung and pytest-timeout ended the worker: do not run them again
        say("CONFORMANCE 98")
        return
    open(started, "w").close()
    sys.path.insert(0, folder)  # their "channels_redis.core" is the shim there
    arguments = [
        os.path.join(folder, "test_core.py"),
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "asyncio_mode=auto",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
        "-o",
        "timeout=60",
        "--rootdir",
        folder,
        "--junitxml",
        os.environ["APP_RESULT"],
        "-k",
        os.environ["APP_DESELECT"],
    ]
    code = pytest.main(arguments)
    say(f"CONFORMANCE {int(code)}")


class Idle(AsyncWorker):
    async def start(self) -> None:
        if sticky.worker_id == 0:
            threading.Thread(target=run_their_tests, name="their-tests", daemon=True).start()

    async def add_connection(self, sock: socket.socket) -> None:
        sock.close()


sticky = StickyServer(workers=3, graceful_timeout=5)
if __name__ == "__main__":
    if sticky.is_master:
        sticky.on_listening(lambda address: say(f"LISTENING {address[0]} {address[1]}"))
        sticky.listen(0, host="127.0.0.1")
    else:
        sticky.work(Idle())
