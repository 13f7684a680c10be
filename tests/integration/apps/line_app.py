"""A test application: one entry script, behaviour chosen by APP_* environment variables.

Each worker answers a connection by reading one line and replying with one JSON
line saying what it saw (its slot and pid, the peer, the socket's family and
blocking mode, and the line it read). Every process records its pid in
APP_PID_DIR so tests can check that none is left behind.
"""

from __future__ import annotations

import array
import ctypes
import errno
import json
import logging
import os
import random
import resource
import select
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

from sticky_server import (
    Balancer,
    ClientInfo,
    LeastConnectionsBalancer,
    StickyServer,
    Worker,
    WorkerSet,
    client_address,
)
from sticky_server.worker import environment


def say(line: str) -> None:
    """One line on stdout in one write: lines from the master and its workers never interleave."""
    os.write(1, (line + "\n").encode())


class GarbageBalancer(Balancer):
    """Returns a slot that does not exist."""

    def pick(self, client: ClientInfo, workers: WorkerSet) -> int:
        return 99


class RaisingBalancer(Balancer):
    def pick(self, client: ClientInfo, workers: WorkerSet) -> int:
        raise RuntimeError("balancer bug")


class SlowBalancer(Balancer):
    """Takes longer than the master allows a pick (PICK_TIME_LIMIT)."""

    def pick(self, client: ClientInfo, workers: WorkerSet) -> int:
        time.sleep(0.1)
        return workers.alive[0]


class ReportingLeastConnections(LeastConnectionsBalancer):
    """Least connections that prints every close report it is told of (the tests wait for these lines)."""

    def connections_closed(self, slot: int, count: int) -> None:
        say(f"CLOSED {slot} {count}")


class LineWorker(Worker):
    def __init__(self, slot: int, control: socket.socket | None = None, sticky: StickyServer | None = None) -> None:
        self.slot = slot
        self.control = control
        self.sticky = sticky
        self.inbox: list[list[Any]] = []
        self.slow_messages = float(os.environ.get("APP_SLOW_MESSAGES", "0"))  # seconds per flood message
        if sticky is not None:
            sticky.on_message(self.on_message)
        self.raise_for = os.environ.get("APP_RAISE_FOR", "")
        self.stop_delay = float(os.environ.get("APP_STOP_DELAY", "0"))
        self.blocked = os.environ.get("APP_BLOCK_SLOT") == str(slot) and first_of_its_kind(f"blocked-{slot}")
        self.garbage = os.environ.get("APP_GARBAGE_SLOT") == str(slot)
        self.close_at_once = os.environ.get("APP_MODE") == "close"
        self.serving: set[threading.Thread] = set()
        self.serving_lock = threading.Lock()

    def on_message(self, sender: int | None, message: Any) -> None:
        self.inbox.append([sender, message])
        if self.slow_messages and isinstance(message, dict) and "flood" in message:
            if message["flood"] == 0:
                say(f"SLOW FLOOD STARTED {self.slot}")
            time.sleep(self.slow_messages)  # a handler doing real work on each message

    def add_connection(self, sock: socket.socket) -> None:
        if self.close_at_once:
            sock.close()
            return
        peer = sock.getpeername()
        if peer[0] == self.raise_for:
            raise RuntimeError(f"add_connection refuses {peer[0]} on purpose")
        if self.blocked:
            time.sleep(3600)  # a worker stuck in user code: it reads its control socket no more
        if self.garbage and self.control is not None:
            # A worker gone mad writes bytes that are no frame to the master.
            self.control.sendall(random.Random(peer[1]).randbytes(64))
        thread = threading.Thread(target=self.serve, args=(sock, peer), daemon=True)
        with self.serving_lock:
            self.serving.add(thread)
        thread.start()

    def serve(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        try:
            self.answer(sock, peer)
        finally:
            with self.serving_lock:
                self.serving.discard(threading.current_thread())

    def answer(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        with sock:
            blocking = sock.getblocking()
            sock.settimeout(10)
            reader = sock.makefile("rb")
            line = reader.readline().decode(errors="replace").strip()
            result = self.command(line[4:]) if line.startswith("cmd ") else None
            reply = {
                "result": result,
                "slot": self.slot,
                "pid": os.getpid(),
                "peer": list(peer[:2]),
                "client": list(client_address(sock)),
                "family": sock.family.name,
                "blocking": blocking,
                "line": line,
            }
            if os.environ.get("APP_MODE") != "http":
                sock.sendall(json.dumps(reply).encode() + b"\n")
                if os.environ.get("APP_MODE") == "hold":
                    sock.settimeout(None)
                    while sock.recv(4096):  # keep the connection until the client closes it
                        pass
                return
            headers = []
            while header := reader.readline().decode("latin-1").strip():
                headers.append(header)
            reply["headers"] = headers
            body = json.dumps(reply).encode()
            head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            sock.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)

    def command(self, text: str) -> Any:
        """Channel commands for the tests: send, publish, flood, inbox, and bad messages."""
        assert self.sticky is not None
        verb, _, argument = text.partition(" ")
        try:
            if verb == "send":
                self.sticky.send(json.loads(argument))
            elif verb == "send-many":
                for n in range(int(argument)):
                    self.sticky.send({"n": n})
            elif verb == "publish":
                self.sticky.publish(json.loads(argument))
            elif verb == "publish-self":
                self.sticky.publish(json.loads(argument), include_self=True)
            elif verb == "inbox":
                return self.inbox
            elif verb == "inbox-count":
                return len(self.inbox)
            elif verb == "send-set":
                self.sticky.send({1, 2})
            elif verb == "send-huge":
                self.sticky.send("x" * (2 * 1024 * 1024))
            elif verb == "send-bigint":  # past the master's int-string digit limit, through the public API
                sys.set_int_max_str_digits(0)
                self.sticky.send(10**5000)
            elif verb == "raw":  # "raw HEX [N]": bytes a worker gone mad writes, with N descriptors attached
                parts = argument.split()
                self.write_raw(bytes.fromhex(parts[0]), int(parts[1]) if len(parts) > 1 else 0)
            elif verb == "raw-send":  # a SEND frame of N bytes of valid JSON, past max_message_size
                body = b'"' + b"x" * (int(argument) - 2) + b'"'
                self.write_raw(struct.pack(">BBHI", 8, 0, 0, len(body)) + body, 0)
            elif verb == "listener":  # "listener OP": what a worker's code tries on the listener it shares
                return self.on_listener(argument)
            elif verb == "dumpable":
                return ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
        except (TypeError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return "ok"

    def on_listener(self, operation: str) -> str:
        assert self.sticky is not None and self.sticky._identity is not None
        listener = self.sticky._identity.listeners[0]
        ret_zero = struct.pack("=HBBI", 0x06, 0, 0, 0)  # a program that sends every client to the first socket
        filters = ctypes.create_string_buffer(ret_zero)
        calls = {
            "shutdown": lambda: listener.shutdown(socket.SHUT_RDWR),
            "connect": lambda: listener.connect(("", 0)),
            "listen": lambda: listener.listen(0),
            "dup": lambda: os.close(os.dup(listener.fileno())),
            "attach": lambda: listener.setsockopt(
                socket.SOL_SOCKET, 51, struct.pack("@HP", 1, ctypes.addressof(filters))
            ),
            "detach": lambda: listener.setsockopt(socket.SOL_SOCKET, 68, 0),
        }
        try:
            calls[operation]()
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, str(exc))
        return "done"

    def write_raw(self, data: bytes, n_fds: int) -> None:
        assert self.control is not None and self.sticky is not None
        fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(n_fds)]
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        with self.sticky._channel._lock:  # type: ignore[union-attr]  # not in the middle of the loop's own frame
            view = memoryview(data)
            while True:
                try:
                    sent = self.control.sendmsg([view], ancillary)
                except BlockingIOError:
                    select.select([], [self.control], [], 5)
                    continue
                view, ancillary = view[sent:], []
                if not view:
                    break
        for fd in fds:
            os.close(fd)

    def stop(self) -> None:
        """Graceful: finish every connection in flight (the master kills us after graceful_timeout)."""
        time.sleep(self.stop_delay)
        with self.serving_lock:
            in_flight = list(self.serving)
        for thread in in_flight:
            thread.join()


def serve_channel(sticky: StickyServer) -> None:
    """The master's side of the channel tests: print what arrives, relay on request."""

    @sticky.on_message
    def relay(worker_id: int, message: Any) -> None:
        say(f"FROM {worker_id} {json.dumps(message)}")
        if isinstance(message, dict):
            if "broadcast" in message:
                sticky.broadcast(message["broadcast"])
            if "to" in message:
                sticky.send(message["data"], to=message["to"])
            if "flood" in message:
                count, size = message["flood"]
                for n in range(count):
                    sticky.broadcast({"flood": n, "pad": "x" * size})

    sticky.on_worker_start(lambda worker_id: say(f"START {worker_id}"))
    sticky.on_worker_exit(lambda worker_id, returncode: say(f"EXIT {worker_id} {returncode}"))


def first_of_its_kind(name: str) -> bool:
    """APP_BLOCK_ONCE: True in the first process to ask (a marker in APP_PID_DIR); always True without it.

    A stuck worker's replacement is a new process, which is not stuck: with this, only
    the first worker of the slot blocks.
    """
    pid_dir = os.environ.get("APP_PID_DIR")
    if not os.environ.get("APP_BLOCK_ONCE") or not pid_dir:
        return True
    try:
        os.close(os.open(os.path.join(pid_dir, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def record_pid(role: str) -> None:
    pid_dir = os.environ.get("APP_PID_DIR")
    if pid_dir:
        Path(pid_dir, f"{role}-{os.getpid()}").touch()


def refuse_every_program_after_the_first() -> None:
    """APP_REFUSE_RESTEER: the kernel takes the first steering program and refuses every later one.

    It is what happens past the program's size limit (about 220 slots), without starting
    220 processes: the first program stays, stale.
    """
    from sticky_server.steering import KernelSteering

    original = KernelSteering.steer

    def steer(self: KernelSteering, slots: tuple[int, ...]) -> None:
        if self.steered:
            raise OSError(f"refused for the test (asked for slots {slots})")
        original(self, slots)

    KernelSteering.steer = steer  # type: ignore[method-assign]


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s %(levelname)s %(message)s")
    if os.environ.get("APP_REFUSE_RESTEER"):
        refuse_every_program_after_the_first()
    balancers = {
        "garbage": GarbageBalancer(),
        "raises": RaisingBalancer(),
        "slow": SlowBalancer(),
        "reporting-least-connections": ReportingLeastConnections(),
    }
    balancer_name = os.environ.get("APP_BALANCER", "ip-hash")
    timeout = float(os.environ.get("APP_TIMEOUT", "30"))
    max_connections = int(os.environ.get("APP_MAX_CONNECTIONS", "0"))
    sticky = StickyServer(
        workers=int(os.environ.get("APP_WORKERS", "3")),
        balancer=balancers.get(balancer_name, balancer_name),
        graceful_timeout=float(os.environ.get("APP_GRACEFUL", "10")),
        timeout=timeout or None,
        max_connections_per_worker=max_connections or None,
        user=os.environ.get("APP_USER") or None,
        proxy_protocol=bool(os.environ.get("APP_PROXY")),
        forwarded_header=os.environ.get("APP_FORWARDED") or None,
        forwarded_header_fallback=bool(os.environ.get("APP_FORWARDED_FALLBACK")),
        trusted_proxies=os.environ["APP_TRUSTED"].split(",") if os.environ.get("APP_TRUSTED") else None,
        header_timeout=float(os.environ.get("APP_HEADER_TIMEOUT", "5")),
        steering=os.environ.get("APP_STEERING", "auto"),
        route_by=os.environ.get("APP_ROUTE_BY") or None,
    )
    mode = os.environ.get("APP_MODE", "normal")
    if sticky.is_master:
        record_pid("master")
        if mode == "work_in_master":
            sticky.work(LineWorker(0))
        sticky.on_listening(lambda address: say(f"LISTENING {address[0]} {address[1]}"))
        sticky.on_stats(lambda stats: say(f"STATS {json.dumps(stats)}"))
        if os.environ.get("APP_CHANNEL"):
            serve_channel(sticky)
        port_text = os.environ.get("APP_PORT", "0")
        sticky.listen(int(port_text), host=os.environ.get("APP_HOST", "127.0.0.1") or None)
        return
    record_pid(f"worker{sticky.worker_id}")
    # A test may lower the master's descriptor limit; workers started after that raise theirs back.
    hard_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    worker_limit = int(os.environ.get("APP_WORKER_NOFILE", "0")) or hard_limit
    resource.setrlimit(resource.RLIMIT_NOFILE, (worker_limit, hard_limit))
    # Descriptors the worker's own code holds (files, outgoing connections).
    extra_fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(int(os.environ.get("APP_WORKER_EXTRA_FDS", "0")))]
    fail_file = os.environ.get("APP_FAIL_BOOT_FILE")
    if fail_file and os.path.exists(fail_file):
        sys.exit(3)
    slow_file = os.environ.get("APP_SLOW_BOOT_FILE")
    if slow_file and os.path.exists(slow_file):
        say(f"SLOW BOOT {sticky.worker_id}")
        time.sleep(10)
    stall_file = os.environ.get("APP_STALL_BOOT_FILE")
    if stall_file and os.path.exists(stall_file):
        say(f"STALLED {sticky.worker_id} {os.getpid()}")
        time.sleep(60)
    if mode == "listen_in_worker":
        sticky.listen(0)
    if mode == "no_add_connection":
        sticky.work(object())
    identity = environment.worker_identity()
    del extra_fds  # (the descriptors stay open: only the list goes)
    sticky.work(LineWorker(sticky.worker_id or 0, identity.control if identity else None, sticky))


if __name__ == "__main__":
    main()
