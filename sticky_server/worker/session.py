"""A worker process's session with its master: hand-offs, frames, messages, sweeps, stop. No loop of its own.

Theory of operation
-------------------
The session is what a worker does; a loop drives it: ``selector_loop.WorkerRuntime``
(a selector, for synchronous workers) or ``asyncio_loop.AsyncWorkerRuntime`` (the
running asyncio loop). The loop watches the control socket, the signal wake-up
socket, the channel's waker and, on the kernel path, the slot's own listeners, and
calls the session's methods when they are ready: ``on_control_readable``,
``on_signals``, ``accept_from``; a slice of messages at a time
(``dispatch_messages``); a sweep every ``CLOSE_SWEEP_INTERVAL``; and at the end
``begin_stop`` and ``end``. The session says when it is done: ``stop_reason``.

Each hand-off frame's descriptors are wrapped as blocking sockets and given to the
user's ``worker.add_connection(sock)``.

Reading a hand-off is taking it: nothing is sent back. What makes a worker crash
lose nothing is on the master's side: it keeps this worker's end of the control
socket open too, so hand-offs still in the socket when this worker dies stay there,
and the master reads them back and routes them again (master rule 2). No byte of
a connection has been read by anyone until this worker reads the hand-off.

Messages from the master go into a bounded inbox as they are read and reach the
handlers a slice at a time (``slices.SLICE_SECONDS``, or one handler call if that
is longer), with a turn of the loop between slices: a hand-off that arrives behind a
flood of messages waits about one slice, not for the flood. A worker whose handlers
fall more than ``MAX_QUEUED_MESSAGE_BYTES`` behind drops the oldest (logged).

Every ``CLOSE_SWEEP_INTERVAL`` seconds while it holds connections, the loop
checks which of them were closed (see ``connections.py``) and reports the count
to the master in a CLOSED frame, for ``WorkerSet.connections``.

It answers every PING from the master's heartbeat with a PONG, from the same
loop: a worker whose loop is stuck (in ``add_connection``, or SIGSTOPped) stops
answering and the master replaces it.

It stops when the master sends STOP (graceful stop), when it gets SIGTERM or
SIGINT (graceful) or SIGQUIT (quick: ``worker.stop()`` is not called), or when
the control socket closes (the master is gone; the worker then exits within
``ORPHAN_EXIT_SECONDS`` even if the user's code would keep it alive). A graceful
stop calls ``worker.stop()`` if the object has one; then ``work()`` returns.

Until it has told the master it is ready, an uncaught exception ends the worker
process with ``EXIT_BOOT_FAILURE`` (3, gunicorn's code for the same), for whoever
reads its exit status. The master itself tells a worker that cannot start from one
that crashed while serving by whether READY came (``supervisor``), not by the code.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from ..errors import ProtocolError
from ..listener import ACCEPT_BACKOFF, ACCEPT_BURST, OutOfDescriptors, accept_waiting
from ..protocol import messages as message_codec
from ..protocol.frames import ID_BYTES, LOST_FD, MASTER_SENDS, Frame, FrameKind, pack_count, unpack_addressed
from ..protocol.messages import DROP_LOG_INTERVAL, MAX_QUEUED_MESSAGE_BYTES
from ..protocol.outbox import DropOldestQueue
from ..protocol.wire import FrameReader
from ..util.slices import SLICE_SECONDS, run_for
from ..util.throttle import ThrottledLog
from .base import ConnectionHandler
from .channel import WorkerChannel
from .connections import RECORD, HandedOffSocket, ProxiedSocket
from .lockdown import retire_listener
from .proxy_hint import ProxyHint
from .sorting import SessionSorter

__all__ = [
    "DEFAULT_STOP_SECONDS",
    "EXIT_BOOT_FAILURE",
    "GRACEFUL_SIGNALS",
    "ORPHAN_EXIT_SECONDS",
    "QUICK_SIGNALS",
    "FollowUp",
    "WorkerSession",
    "describe_peer",
    "exit_on_boot_failure",
]

logger = logging.getLogger("sticky_server.worker")

# A worker whose master died exits this long after noticing, whatever its own code does.
ORPHAN_EXIT_SECONDS = 1.0
EXIT_ORPHANED = 0
# The exit code of a worker that failed before it was ready (gunicorn uses 3 too).
EXIT_BOOT_FAILURE = 3
# Connections lost at the descriptor limit are logged at most once per this many seconds.
NO_ROOM_LOG_INTERVAL = 60.0
GRACEFUL_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
QUICK_SIGNALS = frozenset({signal.SIGQUIT})
# Looked up once: on Python 3.11 each FrameKind.NAME runs a Python-level descriptor.
_MESSAGE = FrameKind.MESSAGE
_HANDOFF = FrameKind.HANDOFF
# A socket accepted from a non-blocking listener inherits O_NONBLOCK on macOS and the
# BSDs, not on Linux (accept4 without SOCK_NONBLOCK); the master keeps it blocking there.
_HANDOFFS_MAY_BE_NONBLOCKING = not sys.platform.startswith("linux")
# Plain ints, looked up once (the socket module's are IntEnum members).
_IPPROTO_TCP = int(socket.IPPROTO_TCP)
_SOCK_STREAM = int(socket.SOCK_STREAM)
_INET_FAMILIES = (int(socket.AF_INET), int(socket.AF_INET6))
_TCP_NODELAY = int(socket.TCP_NODELAY)
# The master's default graceful_timeout; the StickyServer in the worker passes its own.
DEFAULT_STOP_SECONDS = 30.0
# A stop accepts at most this many connections still waiting on the slot's own listener.
MAX_STOP_DRAIN = 65536

# What a loop does with a value a user's callback returned: (value, what it was, its connection or None).
FollowUp = Callable[[object, str, "socket.socket | None"], None]


def exit_on_boot_failure() -> Callable[[], None]:
    """Until the returned function is called, an uncaught exception exits with EXIT_BOOT_FAILURE."""
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, traceback: TracebackType | None) -> None:
        previous(kind, value, traceback)
        sys.stderr.flush()
        os._exit(EXIT_BOOT_FAILURE)

    sys.excepthook = hook

    def disarm() -> None:
        if sys.excepthook is hook:
            sys.excepthook = previous

    return disarm


def exit_soon(seconds: float) -> None:
    """End this process ``seconds`` from now, whatever its threads are doing."""
    timer = threading.Timer(seconds, os._exit, args=(EXIT_ORPHANED,))
    timer.daemon = True
    timer.start()


def descriptor_limit() -> int:
    """This process's soft descriptor limit, as READY tells the master (0: unlimited or too large to tell)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 0 if soft == resource.RLIM_INFINITY or not 0 < soft < 2**32 else soft


def describe_peer(sock: socket.socket) -> str:
    try:
        peer: Any = sock.getpeername()
    except OSError:
        return "a client that already disconnected"
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return repr(peer)


def refuse_awaitable(slot: int, result: object, what: str, sock: socket.socket | None = None) -> None:
    """A synchronous worker's follow-up of a value a user's callback returned: an awaitable is a mistake."""
    if result is not None and inspect.isawaitable(result):  # None first: the per-connection common case
        if inspect.iscoroutine(result):
            result.close()  # never awaited: say so once here rather than in a RuntimeWarning
        logger.error(
            "worker %d: %s returned an awaitable, but this worker runs no event loop; "
            "make the worker asynchronous (subclass sticky_server.AsyncWorker) or use a plain function",
            slot,
            what,
        )
        if sock is not None:
            sock.close()


class WorkerSession:
    """One worker process's session with its master (module docstring); a loop drives it."""

    def __init__(
        self,
        worker: ConnectionHandler,
        channel: WorkerChannel,
        slot: int,
        *,
        on_ready: Callable[[], None] | None = None,
        graceful_timeout: float = DEFAULT_STOP_SECONDS,
        peer_from_proxy: bool = False,
        listeners: Sequence[socket.socket] = (),
        report_accepts_at_once: bool = False,
        proxy_hint: ProxyHint | None = None,
        sorter: SessionSorter | None = None,
    ) -> None:
        self.worker = worker
        # Kernel path with route_by: which accepted connections are this worker's (the rest go to the master).
        self._sorter = sorter
        self._moving: list[int] = []
        # With no proxy setting: looks at the first connections for a proxy nobody declared.
        self._proxy_hint = proxy_hint
        # Kernel path (steering): this slot's own listeners; connections accepted there are
        # delivered as hand-offs are, and counted for the master (ACCEPTED, with the sweep).
        self.listeners = tuple(listeners)
        for listener in self.listeners:
            # Accepted sockets inherit it from their listener (Linux; test_hot_path_assumptions):
            # one call here instead of one per connection.
            listener.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
        self._accepted = 0
        # With max_connections_per_worker the master counts every accept as it happens, not
        # with the sweep: it recycles this worker after that many.
        self._report_accepts_at_once = report_accepts_at_once
        self.accept_paused_until: float | None = None
        self._listener_broken = False
        # A worker may say it is full (the WSGI worker past max_connections): then it accepts nothing.
        has_room = getattr(worker, "has_room", None)
        self._has_room: Callable[[], bool] | None = has_room if callable(has_room) else None
        # PROXY protocol: the header named the client for the whole connection (connections.py).
        self._peer_from_proxy = peer_from_proxy
        self._graceful_timeout = graceful_timeout
        self.channel = channel
        self.control = channel.control
        self.slot = slot
        self._on_ready = on_ready
        self._reader = FrameReader(MASTER_SENDS)
        # Messages read but not yet given to the handlers (see dispatch_messages).
        self._inbox = DropOldestQueue()
        self.slice_seconds = SLICE_SECONDS
        self._inbox_dropped_log = ThrottledLog(
            logger,
            logging.WARNING,
            "dropped %d oldest message(s) received by worker %d: its message handlers fell over %d bytes behind",
            DROP_LOG_INTERVAL,
        )
        self._no_room_log = ThrottledLog(
            logger,
            logging.ERROR,
            "lost %d connection(s) handed to worker %d: it is at its descriptor limit (%d), so the kernel "
            "closed them; raise the limit (`ulimit -n`, LimitNOFILE= under systemd)",
            NO_ROOM_LOG_INTERVAL,
        )
        self.stop_reason: str | None = None
        self.quick = False
        self.master_lost = False
        self.stop_deadline: float | None = None  # when the master kills this process, once a stop began
        # What to do with what a user's callback returns: a synchronous loop refuses an awaitable; the
        # asyncio loop sets its own, which runs it as a task.
        self.follow_up: FollowUp = functools.partial(refuse_awaitable, slot)

    @property
    def has_messages(self) -> bool:
        """Messages wait for the handlers: the loop gives them a slice before it sleeps."""
        return bool(self._inbox)

    @property
    def has_connections(self) -> bool:
        """It holds connections or accepted some unreported: the loop sweeps every ``CLOSE_SWEEP_INTERVAL``."""
        return bool(len(RECORD) or self._accepted)

    def time_left_to_stop(self) -> float:
        """Seconds left before the master kills this process once a stop began (the whole timeout before)."""
        if self.stop_deadline is None:
            return self._graceful_timeout
        return max(0.0, self.stop_deadline - time.monotonic())

    def accept_from(self, listener: socket.socket, limit: int = ACCEPT_BURST) -> bool:
        """Take up to ``limit`` connections from this slot's own listener (kernel path).

        Returns False when out of descriptors: accepting then pauses for
        ``ACCEPT_BACKOFF`` (the connections wait in the kernel), and the master hears
        NO_ROOM, so it routes this worker's clients elsewhere until some close.
        """
        if self._has_room is not None and not self._has_room():
            # The worker's server is at its own limit: new clients wait in the kernel's queue.
            self.accept_paused_until = time.monotonic() + ACCEPT_BACKOFF
            return False
        serve, sorter = self._serve, self._sorter
        # Every connection accepted here is TCP of the listener's family, with the listener's
        # TCP_NODELAY: naming all three spares socket() its getsockopt calls (asyncio looks at
        # proto before it turns Nagle off itself).
        family = int(listener.family)
        proto = _IPPROTO_TCP if family in _INET_FAMILIES else 0
        try:
            for fd, _ in accept_waiting(listener, limit):
                self._accepted += 1
                sock = HandedOffSocket(family, _SOCK_STREAM, proto, fd)
                if sorter is None or sorter.keeps(sock):
                    serve(sock, fd, None)
                else:  # the master's once the MOVED frame is out (route_by)
                    self._moving.append(sock.detach())
                    self._accepted -= 1
        except OutOfDescriptors:
            self.accept_paused_until = time.monotonic() + ACCEPT_BACKOFF
            self._no_room(0)
            return False
        except OSError as exc:
            # It stopped listening (a process holding it shut it down): the master gives the slot a
            # new listener and a new worker; until then this one tries again now and then.
            if not self._listener_broken:
                self._listener_broken = True
                logger.warning("worker %d: its listener stopped listening (%s); the master replaces it", self.slot, exc)
            self.accept_paused_until = time.monotonic() + ACCEPT_BACKOFF
            return False
        finally:
            if sorter is not None and sorter.kept_new and (self._moving or sorter.report_due()):
                self._report_sessions()  # before the moved ones: the master places those by the counts
            if self._moving:
                self.channel.put_moved(list(self._moving))
                self._moving.clear()
            if self._report_accepts_at_once:
                self._report_accepted()
        return True

    def _report_accepted(self) -> None:
        if self._accepted:
            self.channel.put_control(FrameKind.ACCEPTED, pack_count(self._accepted))
            self._accepted = 0

    def _report_sessions(self) -> None:
        """Route_by on the kernel path: the new sessions kept since the last report (with the sweep, every
        ``SESSIONS_REPORT_INTERVAL`` while it keeps new ones, and at once when it passes new ones on)."""
        if self._sorter is not None and self._sorter.kept_new:
            self.channel.put_control(FrameKind.SESSIONS, pack_count(self._sorter.kept_new))
            self._sorter.reported()

    def _close_listeners(self) -> None:
        """On a stop: take what already waits (not on a quick stop), then close this process's copies.

        The master keeps its own copy of each listener open, so nothing queued after
        this is lost: a replacement worker or the master takes it.
        """
        for listener in self.listeners:
            if not self.quick and self.accept_paused_until is None:
                self.accept_from(listener, MAX_STOP_DRAIN)
            retire_listener(listener)
        self.listeners = ()

    def announce_ready(self) -> None:
        self.channel.put_control(FrameKind.READY, pack_count(descriptor_limit()))
        if self._on_ready is not None:
            self._on_ready()
        logger.debug("worker %d (pid %d) ready", self.slot, os.getpid())

    def on_signals(self, signums: list[int]) -> None:
        for signum in signums:
            self.stop_reason = f"got {signal.Signals(signum).name}"
            self.quick = self.quick or signum in QUICK_SIGNALS

    def sweep(self) -> None:
        self._report_accepted()  # before CLOSED: the master counts these live first
        self._report_sessions()
        closed = RECORD.sweep()
        if closed:
            self.channel.put_control(FrameKind.CLOSED, pack_count(closed))

    def on_control_readable(self) -> None:
        frames: list[Frame] = []
        taken_fds: list[int] = []
        taken_addresses: list[tuple[str, int] | None] = []
        pinged = False
        dropped = 0
        try:
            frames, closed = self._reader.read_from(self.control)
            inbox = self._inbox
            for frame in frames:
                kind = frame.kind
                if kind is _MESSAGE:  # the most frequent kind first
                    dropped += inbox.put(frame.payload, MAX_QUEUED_MESSAGE_BYTES)
                elif kind is _HANDOFF:
                    if len(frame.payload) != ID_BYTES * len(frame.fds):
                        raise ProtocolError(
                            f"hand-off with {len(frame.payload)} bytes of ids and {len(frame.fds)} descriptors"
                        )
                    taken_fds += frame.fds
                    taken_addresses += [None] * len(frame.fds)
                elif kind is FrameKind.HANDOFF_PROXIED:  # the master learned the client addresses from a proxy
                    ids, addresses = unpack_addressed(frame.payload)
                    if len(ids) != len(frame.fds):
                        raise ProtocolError(f"hand-off with {len(ids)} ids and {len(frame.fds)} descriptors")
                    taken_fds += frame.fds
                    taken_addresses += addresses
                elif kind is FrameKind.PING:
                    pinged = True
                elif kind is FrameKind.STOP:
                    self.stop_reason = "the master asked"
                elif kind is FrameKind.ROUTES and self._sorter is not None:
                    self._sorter.update(frame.payload)
        except BlockingIOError:
            return
        except ProtocolError as exc:
            for frame in frames:
                for fd in frame.fds:
                    if fd != LOST_FD:
                        os.close(fd)
            self._on_protocol_error(exc)
            return
        if dropped:
            self._inbox_dropped_log.note(dropped, self.slot, MAX_QUEUED_MESSAGE_BYTES)
        if taken_fds:
            deliver = self._deliver
            lost = 0
            for fd, address in zip(taken_fds, taken_addresses, strict=True):
                if fd == LOST_FD:
                    lost += 1
                else:
                    deliver(fd, address)
            if lost:
                self._no_room(lost)
        if pinged:
            self.channel.put_control(FrameKind.PONG)
        if closed:
            self.master_gone("the control socket closed")

    def _no_room(self, lost: int) -> None:
        """Hand-offs arrived while this process had no descriptor left: the kernel closed them (wire, master rule 3).

        The worker goes on with the connections it has; the master hears of it and
        routes this worker's clients elsewhere until some of its connections close.
        """
        if lost:
            self._no_room_log.note(lost, self.slot, descriptor_limit())
        self.channel.put_control(FrameKind.NO_ROOM, pack_count(lost))

    def _on_protocol_error(self, error: ProtocolError) -> None:
        logger.error("worker %d: the master sent an invalid frame (%s); stopping", self.slot, error)
        self.stop_reason = "protocol error"
        self._inbox.clear()

    def dispatch_messages(self, seconds: float | None) -> None:
        """Give queued messages to the handlers, in order, for about ``seconds`` (None: all of them).

        Messages are read as they arrive but handled a slice at a time, so the
        loop keeps reading the control socket: a hand-off behind a flood of
        messages is taken within a slice rather than after the whole flood.
        """
        try:
            run_for(self._inbox, self._dispatch_delivery, seconds)
        except ProtocolError as exc:
            self._on_protocol_error(exc)

    def _dispatch_delivery(self, delivery: bytes) -> None:
        self._dispatch_message(*message_codec.unpack_delivery(delivery))

    def finish_messages(self) -> None:
        """On a stop, the messages received before it still reach the handlers (not on a quick stop)."""
        if self.quick:
            self._inbox.clear()
        else:
            self.dispatch_messages(None)

    def _dispatch_message(self, sender: int | None, message: Any) -> None:
        for handler in self.channel.handlers:
            try:
                self.follow_up(handler(sender, message), "a message handler", None)
            except Exception:
                logger.exception("worker %d: a message handler raised", self.slot)

    def _deliver(self, fd: int, address: tuple[str, int] | None, nodelay: bool = True) -> None:
        """Wrap ``fd`` and give it to ``add_connection``; ``nodelay=False``: it has ``TCP_NODELAY`` already."""
        try:
            # Every hand-off is a stream socket: naming the type spares a getsockopt. The
            # family and the protocol come from the socket (asyncio, for one, looks at
            # proto before it turns Nagle off).
            if address is not None and self._peer_from_proxy:
                sock: HandedOffSocket = ProxiedSocket(type=socket.SOCK_STREAM, fileno=fd)
                sock.told_peer = address
            else:
                sock = HandedOffSocket(type=socket.SOCK_STREAM, fileno=fd)
                if address is not None and address[0] and sock.family == socket.AF_UNIX:
                    # A Unix-socket peer has no address for the framework to replace with the
                    # forwarded one it reads itself (uvicorn trusts none): the header's client is it.
                    sock = ProxiedSocket(type=socket.SOCK_STREAM, fileno=sock.detach())
                    sock.told_peer = address
            if nodelay and sock.proto == _IPPROTO_TCP:
                # As every Python web server does: without it, a response written in two
                # pieces waits for the client's delayed ACK (40 ms on Linux).
                sock.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
        except OSError as exc:
            os.close(fd)
            logger.error("worker %d: a handed-off descriptor is not a socket (%s); closed it", self.slot, exc)
            return
        self._serve(sock, fd, address)

    def _serve(self, sock: HandedOffSocket, fd: int, address: tuple[str, int] | None) -> None:
        """Record the connection and give it to ``add_connection``."""
        if _HANDOFFS_MAY_BE_NONBLOCKING or socket.getdefaulttimeout() is not None:
            sock.setblocking(True)
        RECORD.add(fd, address)
        if self._proxy_hint is not None and self._proxy_hint.look(sock):
            self._proxy_hint = None
        try:
            self.follow_up(self.worker.add_connection(sock), "add_connection", sock)
        except Exception:
            logger.exception(
                "worker %d: add_connection raised; closed the connection from %s", self.slot, describe_peer(sock)
            )
            sock.close()

    def master_gone(self, why: str) -> None:
        self.master_lost = True
        self.stop_reason = why
        logger.warning(
            "worker %d (pid %d): the master is gone (%s); exiting within %.1f s",
            self.slot,
            os.getpid(),
            why,
            ORPHAN_EXIT_SECONDS,
        )
        exit_soon(ORPHAN_EXIT_SECONDS)

    def begin_stop(self) -> Callable[[], Any] | None:
        """Stop taking frames; the worker's ``stop`` to call, or None (quick stop, or it has none)."""
        logger.debug("worker %d stopping: %s", self.slot, self.stop_reason)
        self.stop_deadline = time.monotonic() + self._graceful_timeout
        self._close_listeners()
        if self._accepted and not self.master_lost:
            with contextlib.suppress(OSError):
                self.sweep()
                self.channel.flush()
        self._reader.close()
        self.channel.close()
        stop = None if self.quick else getattr(self.worker, "stop", None)
        return stop if callable(stop) else None

    def end(self) -> None:
        if not self.master_lost:
            self.control.close()
