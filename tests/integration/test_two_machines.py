"""Past one machine, on loopback: HAProxy in front of two sticky masters, python-socketio and Channels over Redis.

The topology the README's "Scaling past one machine" describes, with the real
programs from Debian's packages: HAProxy (``balance source``, ``hash-type
consistent``, ``send-proxy``) in front of two masters (two ports standing for two
machines), each with 2 workers and ``proxy_protocol=True``; python-socketio's own
``AsyncRedisManager`` on a real redis-server carries broadcasts between them.
Every client (a distinct 127.x address, polling first and then websocket, a new
TCP connection per request) must complete the handshake, which fails unless all
its connections reach one worker of one master, and must hear every broadcast once.
The same for the Django Channels tutorial's chat under the command, with channels-redis's
layer on the same Redis (the one-machine layer, ``StickyChannelLayer``, swapped for it).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import StartApp
from .harness import CLIENT_IPS, HERE, free_port, stop_process, wait_until
from .socketio_clients import SHOUTS, chat
from .websocket_chat import assert_each_heard_each_once
from .websocket_chat import chat as websocket_chat

pytest.importorskip("socketio")
pytest.importorskip("redis")
SOCKETIO_APP = HERE / "apps" / "socketio_app.py"
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
REDIS = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
if HAPROXY is None or REDIS is None:
    if os.environ.get("CI"):
        raise RuntimeError("haproxy and redis-server must be installed; .ci/run installs them")
    pytest.skip("needs haproxy and redis-server (apt-get install haproxy redis-server)", allow_module_level=True)

CLIENTS = CLIENT_IPS[:20]
HAPROXY_CONFIG = """
global
    maxconn 2000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend front
    bind 127.0.0.1:{front}
    default_backend machines
backend machines
    balance source
    hash-type consistent
    server machine_a 127.0.0.1:{port_a} send-proxy
    server machine_b 127.0.0.1:{port_b} send-proxy
"""


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


Daemon = Callable[[list[str], int], subprocess.Popen[bytes]]


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    """Run a program in the foreground until it listens on ``port``; stop each by pid afterwards."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(command: list[str], port: int) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        processes.append(process)
        if not wait_until(lambda: listening(port) or process.poll() is not None, timeout=15) or not listening(port):
            process.kill()
            output = process.communicate(timeout=10)[0].decode(errors="replace")
            raise AssertionError(f"{command[0]} did not start:\n{output}")
        return process

    yield start

    for process in processes:
        stop_process(process)


def test_haproxy_in_front_of_two_masters_with_redis_broadcasts(
    start_app: StartApp, daemon: Daemon, tmp_path: Path
) -> None:
    assert REDIS is not None and HAPROXY is not None
    redis_port, port_a, port_b, front = free_port(), free_port(), free_port(), free_port()
    daemon([REDIS, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], redis_port)
    masters = {}
    for name, port in (("a", port_a), ("b", port_b)):
        env = {
            "APP_WORKERS": "2",
            "APP_PORT": str(port),
            "APP_PROXY": "1",
            "APP_NAME": name,
            "APP_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        }
        masters[name] = start_app(env, script=SOCKETIO_APP)
    for server in masters.values():
        server.wait_listening(timeout=60)
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(front=front, port_a=port_a, port_b=port_b))
    daemon([HAPROXY, "-db", "-f", str(config)], front)

    result = asyncio.run(chat(front, CLIENTS))

    assert not result["failures"], result["failures"]
    assert set(result["transports"].values()) == {"websocket"} and len(result["transports"]) == len(CLIENTS)
    machines = {ip: who["master"] for ip, who in result["who"].items()}
    assert set(machines.values()) == {"a", "b"}, f"every client on one machine proves nothing: {machines}"
    # Each master's workers: the clients it got are spread over both of them.
    for name in ("a", "b"):
        assert len({who["worker"] for who in result["who"].values() if who["master"] == name}) == 2, result["who"]
    for ip in CLIENTS:
        assert sorted(result["heard"][ip]) == sorted(SHOUTS), (ip, machines[ip], result["heard"][ip])


def test_haproxy_in_front_of_two_masters_with_the_channels_chat_on_channels_redis(
    start_app: StartApp, daemon: Daemon, tmp_path: Path
) -> None:
    pytest.importorskip("channels_redis")
    assert REDIS is not None and HAPROXY is not None
    redis_port, port_a, port_b, front = free_port(), free_port(), free_port(), free_port()
    daemon([REDIS, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], redis_port)
    masters = {}
    for name, port in (("a", port_a), ("b", port_b)):
        command = [sys.executable, "-m", "sticky_server", "apps.django_chat:application", "--asgi", "-w", "2"]
        command += ["-b", f"127.0.0.1:{port}", "--proxy-protocol", "--trusted-proxy", "127.0.0.1"]
        env = {
            "APP_NAME": name,
            "APP_LAYER": "channels_redis.core.RedisChannelLayer",
            "APP_LAYER_HOSTS": f"redis://127.0.0.1:{redis_port}/0",
        }
        masters[name] = start_app(env, command=[*command, "--graceful-timeout", "2"], cwd=HERE)
    for server in masters.values():
        server.wait_for(r"listening on 127\.0\.0\.1:\d+ with", 60)
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(front=front, port_a=port_a, port_b=port_b))
    daemon([HAPROXY, "-db", "-f", str(config)], front)

    heard = asyncio.run(websocket_chat(front, "/ws/chat/lobby/", len(CLIENTS)))

    assert_each_heard_each_once(heard, "message")
    senders = {(entry["machine"], entry["worker"]) for messages in heard.values() for entry in messages}
    assert {machine for machine, _ in senders} == {"a", "b"}, senders  # both machines sent to everyone
