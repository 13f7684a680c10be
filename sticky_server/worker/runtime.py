"""The worker side: receive connections from the master and give them to the user's worker.

Theory of operation
-------------------
``work(worker)`` checks the worker object, tells the master READY, and then loops
on two things: the control socket and the signal wake-up socket. For every
hand-off frame it reads, it wraps each descriptor as a blocking ``socket.socket``
and calls ``worker.add_connection(sock)``.

Reading a hand-off is taking it: nothing is sent back. What makes a worker crash
lose nothing is on the master's side: it keeps this worker's end of the control
socket open too, so hand-offs still in the socket when this worker dies stay there,
and the master reads them back and routes them again (master, rule 2). No byte of
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
import inspect
import logging
import os
import resource
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from ..errors import ProtocolError
from ..listener import ACCEPT_BACKOFF, ACCEPT_BURST, OutOfDescriptors, accept_waiting
from ..protocol import messages as channel_codec
from ..protocol.frames import ID_BYTES, LOST_FD, MASTER_SENDS, Frame, FrameKind, pack_count, unpack_addressed
from ..protocol.messages import DROP_LOG_INTERVAL, MAX_QUEUED_MESSAGE_BYTES
from ..protocol.outbox import DropOldestQueue
from ..protocol.wire import FrameReader
from ..util.signals import SignalQueue
from ..util.slices import SLICE_SECONDS, run_for
from ..util.throttle import ThrottledLog
from .channel import WorkerChannel
from .connections import CLOSE_SWEEP_INTERVAL, RECORD, HandedOffSocket, ProxiedSocket
from .lockdown import retire_listener
from .proxy_hint import ProxyHint

__all__ = [
    "EXIT_BOOT_FAILURE",
    "ORPHAN_EXIT_SECONDS",
    "ConnectionHandler",
    "Worker",
    "WorkerRuntime",
    "check_worker",
    "exit_on_boot_failure",
    "time_left_to_stop",
]

logger = logging.getLogger("sticky_server.worker")

# A worker whose master died exits this long after noticing, whatever its own code does.
ORPHAN_EXIT_SECONDS = 1.0
EXIT_ORPHANED = 0
# The exit code of a worker that failed before it was ready (gunicorn uses 3 too).
EXIT_BOOT_FAILURE = 3
# Connections lost at the descriptor limit are logged at most once per this many seconds.
NO_ROOM_LOG_INTERVAL = 60.0
_GRACEFUL_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
_QUICK_SIGNALS = frozenset({signal.SIGQUIT})
# Looked up once: on Python 3.11 each FrameKind.NAME runs a Python-level descriptor.
_MESSAGE = FrameKind.MESSAGE
_HANDOFF = FrameKind.HANDOFF
# A socket accepted from a non-blocking listener inherits O_NONBLOCK on macOS and the
# BSDs, not on Linux (accept4 without SOCK_NONBLOCK); the master keeps it blocking there.
_HANDOFFS_MAY_BE_NONBLOCKING = not sys.platform.startswith("linux")
# Plain ints, looked up once (the socket module's are IntEnum members).
_IPPROTO_TCP = int(socket.IPPROTO_TCP)
_TCP_NODELAY = int(socket.TCP_NODELAY)
# The master's default graceful_timeout; the StickyServer in the worker passes its own.
DEFAULT_STOP_SECONDS = 30.0
# A stop accepts at most this many connections still waiting on the slot's own listener.
MAX_STOP_DRAIN = 65536
# When the master will kill this process, once a stop began (see time_left_to_stop).
_stop_deadline: float | None = None


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


@runtime_checkable
class ConnectionHandler(Protocol):
    """Anything ``work()`` accepts: an object with ``add_connection(sock)``."""

    def add_connection(self, sock: socket.socket) -> object: ...


class Worker:
    """Optional base class for worker objects; any object with ``add_connection`` works.

    Subclass it, build your server in ``__init__`` (without a listening socket:
    the master owns that), and give it each connection in ``add_connection``.
    """

    def add_connection(self, sock: socket.socket) -> None:
        """Take ownership of a connected, blocking socket whose peer is the client.

        Called on the thread that called ``work()``, once per connection routed to
        this worker. No byte of the connection has been read. A TCP socket comes with
        ``TCP_NODELAY`` on, as web servers set it. Hand the socket to
        your server and return quickly: the next connection waits for this call.
        If it raises, the error is logged and the socket is closed.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement add_connection(sock)")

    def stop(self) -> None:
        """Called once when this worker is told to stop; finish in-flight work and return.

        The master waits up to its ``graceful_timeout`` for the process to exit.
        """


def check_worker(worker: object) -> ConnectionHandler:
    """Return ``worker`` if it has a callable ``add_connection``; raise TypeError naming what is missing."""
    add_connection = getattr(worker, "add_connection", None)
    kind = type(worker).__name__
    if add_connection is None:
        raise TypeError(
            f"work() needs an object with an add_connection(sock) method; {kind} has none. "
            "Add one, or subclass sticky_server.Worker."
        )
    if not callable(add_connection):
        raise TypeError(
            f"work() needs add_connection to be a method taking a socket; {kind}.add_connection "
            f"is a {type(add_connection).__name__}."
        )
    return worker  # type: ignore[return-value]


def time_left_to_stop() -> float:
    """Seconds this worker has left to finish once told to stop, before the master kills it.

    Adapters wait this long (less a margin) for requests in flight when they have
    no ``shutdown_timeout`` of their own. Before a stop began it is the whole
    graceful timeout (``DEFAULT_STOP_SECONDS`` outside a worker).
    """
    if _stop_deadline is None:
        return DEFAULT_STOP_SECONDS
    return max(0.0, _stop_deadline - time.monotonic())


def exit_soon(seconds: float) -> None:
    """End this process ``seconds`` from now, whatever its threads are doing."""
    timer = threading.Timer(seconds, os._exit, args=(EXIT_ORPHANED,))
    timer.daemon = True
    timer.start()


def descriptor_limit() -> int:
    """This process's soft descriptor limit, as READY tells the master (0: unlimited or too large to tell)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 0 if soft == resource.RLIM_INFINITY or not 0 < soft < 2**32 else soft


def _describe_peer(sock: socket.socket) -> str:
    try:
        peer: Any = sock.getpeername()
    except OSError:
        return "a client that already disconnected"
    if isinstance(peer, tuple):
        return f"{peer[0]}:{peer[1]}"
    return repr(peer)


class WorkerRuntime:
    """Runs the worker loop of one worker process (see the module docstring)."""

    def __init__(
        self,
        worker: ConnectionHandler,
        channel: WorkerChannel,
        slot: int,
        on_ready: Callable[[], None] | None = None,
        graceful_timeout: float = DEFAULT_STOP_SECONDS,
        peer_from_proxy: bool = False,
        listeners: Sequence[socket.socket] = (),
        report_accepts_at_once: bool = False,
        proxy_hint: ProxyHint | None = None,
    ) -> None:
        self._worker = worker
        # With no proxy setting: looks at the first connections for a proxy nobody declared.
        self._proxy_hint = proxy_hint
        # Kernel path (steering): this slot's own listeners; connections accepted there are
        # delivered as hand-offs are, and counted for the master (ACCEPTED, with the sweep).
        self._listeners = tuple(listeners)
        for listener in self._listeners:
            # Accepted sockets inherit it from their listener (Linux; test_hot_path_assumptions):
            # one call here instead of one per connection.
            listener.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
        self._accepted = 0
        # With max_connections_per_worker the master counts every accept as it happens, not
        # with the sweep: it recycles this worker after that many.
        self._report_accepts_at_once = report_accepts_at_once
        self._accept_paused_until: float | None = None
        self._listener_broken = False
        # A worker may say it is full (the WSGI worker past max_connections): then it accepts nothing.
        has_room = getattr(worker, "has_room", None)
        self._has_room: Callable[[], bool] | None = has_room if callable(has_room) else None
        # PROXY protocol: the header named the client for the whole connection (connections.py).
        self._peer_from_proxy = peer_from_proxy
        self._graceful_timeout = graceful_timeout
        self._channel = channel
        self._control = channel.control
        self._slot = slot
        self._on_ready = on_ready
        self._reader = FrameReader(MASTER_SENDS)
        # Messages read but not yet given to the handlers (see _dispatch_messages).
        self._inbox = DropOldestQueue()
        self._slice_seconds = SLICE_SECONDS
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
        self._stop_reason: str | None = None
        self._quick = False
        self._master_lost = False

    def run(self) -> None:
        """Serve hand-offs until told to stop, then call ``worker.stop()`` and return."""
        control, channel = self._control, self._channel
        signals = SignalQueue(_GRACEFUL_SIGNALS | _QUICK_SIGNALS)
        selector = selectors.DefaultSelector()
        writing = False
        next_sweep = time.monotonic() + CLOSE_SWEEP_INTERVAL
        try:
            selector.register(control, selectors.EVENT_READ)
            selector.register(signals.fileno(), selectors.EVENT_READ)
            selector.register(channel.waker.fileno(), selectors.EVENT_READ)
            self._announce_ready()
            for listener in self._listeners:
                selector.register(listener, selectors.EVENT_READ, listener)
            while self._stop_reason is None:
                if (writing or channel.pending()) and channel.flush() == writing:
                    writing = not writing
                    selector.modify(control, selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0))
                if self._inbox:
                    timeout: float | None = 0.0  # only look for hand-offs, then go on with the messages
                elif len(RECORD) or self._accepted:
                    timeout = max(0.0, next_sweep - time.monotonic())
                else:
                    timeout = None
                if self._accept_paused_until is not None:
                    timeout = self._after_accept_pause(selector, timeout)
                for key, mask in selector.select(timeout):
                    if key.data is not None:  # (one batch can hold several listeners after a pause began)
                        if self._accept_paused_until is None and not self._accept_from(key.data):
                            for listener in self._listeners:
                                selector.unregister(listener)
                    elif key.fileobj is control:
                        if mask & selectors.EVENT_READ:
                            self._on_control_readable()
                    elif key.fileobj == channel.waker.fileno():
                        channel.waker.clear()  # the flush at the top of the loop writes what woke us
                    else:
                        self._on_signals(signals.drain())
                if self._inbox:
                    self._dispatch_messages(self._slice_seconds)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + CLOSE_SWEEP_INTERVAL
                    self._sweep()
            self._finish_messages()
            if not self._master_lost:
                channel.flush()  # a last try for what the worker sent while stopping
        except (BrokenPipeError, ConnectionResetError):
            self._master_gone("the control socket broke")
        finally:
            selector.close()
            signals.restore()
        stop = self._begin_stop()
        if stop is not None:
            try:
                stop()
            except Exception:
                logger.exception("worker %d: stop() raised", self._slot)
        self._end()

    def _after_accept_pause(self, selector: selectors.BaseSelector, timeout: float | None) -> float | None:
        """Watch the listeners again once an accept pause is over; the select timeout until then."""
        assert self._accept_paused_until is not None
        left = self._accept_paused_until - time.monotonic()
        if left > 0:
            return left if timeout is None else min(timeout, left)
        self._accept_paused_until = None
        for listener in self._listeners:
            selector.register(listener, selectors.EVENT_READ, listener)
        return timeout

    # --- the parts both loops share (see async_worker.py for the asyncio one) ---------

    def _accept_from(self, listener: socket.socket, limit: int = ACCEPT_BURST) -> bool:
        """Take up to ``limit`` connections from this slot's own listener (kernel path).

        Returns False when out of descriptors: accepting then pauses for
        ``ACCEPT_BACKOFF`` (the connections wait in the kernel), and the master hears
        NO_ROOM, so it routes this worker's clients elsewhere until some close.
        """
        if self._has_room is not None and not self._has_room():
            # The worker's server is at its own limit: new clients wait in the kernel's queue.
            self._accept_paused_until = time.monotonic() + ACCEPT_BACKOFF
            return False
        deliver = self._deliver
        try:
            for fd, _ in accept_waiting(listener, limit):
                self._accepted += 1
                deliver(fd, None, False)
        except OutOfDescriptors:
            self._accept_paused_until = time.monotonic() + ACCEPT_BACKOFF
            self._no_room(0)
            return False
        except OSError as exc:
            # It stopped listening (a process holding it shut it down): the master gives the slot a
            # new listener and a new worker; until then this one tries again now and then.
            if not self._listener_broken:
                self._listener_broken = True
                logger.warning(
                    "worker %d: its listener stopped listening (%s); the master replaces it", self._slot, exc
                )
            self._accept_paused_until = time.monotonic() + ACCEPT_BACKOFF
            return False
        finally:
            if self._report_accepts_at_once:
                self._report_accepted()
        return True

    def _report_accepted(self) -> None:
        if self._accepted:
            self._channel.put_control(FrameKind.ACCEPTED, pack_count(self._accepted))
            self._accepted = 0

    def _close_listeners(self) -> None:
        """On a stop: take what already waits (not on a quick stop), then close this process's copies.

        The master keeps its own copy of each listener open, so nothing queued after
        this is lost: a replacement worker or the master takes it.
        """
        for listener in self._listeners:
            if not self._quick and self._accept_paused_until is None:
                self._accept_from(listener, MAX_STOP_DRAIN)
            retire_listener(listener)
        self._listeners = ()

    def _announce_ready(self) -> None:
        self._channel.put_control(FrameKind.READY, pack_count(descriptor_limit()))
        if self._on_ready is not None:
            self._on_ready()
        logger.debug("worker %d (pid %d) ready", self._slot, os.getpid())

    def _on_signals(self, signums: list[int]) -> None:
        for signum in signums:
            self._stop_reason = f"got {signal.Signals(signum).name}"
            self._quick = self._quick or signum in _QUICK_SIGNALS

    def _sweep(self) -> None:
        self._report_accepted()  # before CLOSED: the master counts these live first
        closed = RECORD.sweep()
        if closed:
            self._channel.put_control(FrameKind.CLOSED, pack_count(closed))

    def _on_control_readable(self) -> None:
        frames: list[Frame] = []
        taken_fds: list[int] = []
        taken_addresses: list[tuple[str, int] | None] = []
        pinged = False
        dropped = 0
        try:
            frames, closed = self._reader.read_from(self._control)
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
                    self._stop_reason = "the master asked"
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
            self._inbox_dropped_log.note(dropped, self._slot, MAX_QUEUED_MESSAGE_BYTES)
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
            self._channel.put_control(FrameKind.PONG)
        if closed:
            self._master_gone("the control socket closed")

    def _no_room(self, lost: int) -> None:
        """Hand-offs arrived while this process had no descriptor left: the kernel closed them (wire, rule 3).

        The worker goes on with the connections it has; the master hears of it and
        routes this worker's clients elsewhere until some of its connections close.
        """
        if lost:
            self._no_room_log.note(lost, self._slot, descriptor_limit())
        self._channel.put_control(FrameKind.NO_ROOM, pack_count(lost))

    def _on_protocol_error(self, error: ProtocolError) -> None:
        logger.error("worker %d: the master sent an invalid frame (%s); stopping", self._slot, error)
        self._stop_reason = "protocol error"
        self._inbox.clear()

    def _dispatch_messages(self, seconds: float | None) -> None:
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
        self._dispatch_message(*channel_codec.unpack_delivery(delivery))

    def _finish_messages(self) -> None:
        """On a stop, the messages received before it still reach the handlers (not on a quick stop)."""
        if self._quick:
            self._inbox.clear()
        else:
            self._dispatch_messages(None)

    def _dispatch_message(self, sender: int | None, message: Any) -> None:
        for handler in self._channel.handlers:
            try:
                self._follow_up(handler(sender, message), "a message handler")
            except Exception:
                logger.exception("worker %d: a message handler raised", self._slot)

    def _follow_up(self, result: object, what: str, sock: socket.socket | None = None) -> None:
        """What to do with a value a user's callback returned; the asyncio runtime runs awaitables."""
        if result is not None and inspect.isawaitable(result):  # None first: the per-connection common case
            if inspect.iscoroutine(result):
                result.close()  # never awaited: say so once here rather than in a RuntimeWarning
            logger.error(
                "worker %d: %s returned an awaitable, but this worker runs no event loop; "
                "make the worker asynchronous (subclass sticky_server.AsyncWorker) or use a plain function",
                self._slot,
                what,
            )
            if sock is not None:
                sock.close()

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
            logger.error("worker %d: a handed-off descriptor is not a socket (%s); closed it", self._slot, exc)
            return
        if _HANDOFFS_MAY_BE_NONBLOCKING or socket.getdefaulttimeout() is not None:
            sock.setblocking(True)
        RECORD.add(fd, address)
        if self._proxy_hint is not None and self._proxy_hint.look(sock):
            self._proxy_hint = None
        try:
            self._follow_up(self._worker.add_connection(sock), "add_connection", sock)
        except Exception:
            logger.exception(
                "worker %d: add_connection raised; closed the connection from %s", self._slot, _describe_peer(sock)
            )
            sock.close()

    def _master_gone(self, why: str) -> None:
        self._master_lost = True
        self._stop_reason = why
        logger.warning(
            "worker %d (pid %d): the master is gone (%s); exiting within %.1f s",
            self._slot,
            os.getpid(),
            why,
            ORPHAN_EXIT_SECONDS,
        )
        exit_soon(ORPHAN_EXIT_SECONDS)

    def _begin_stop(self) -> Callable[[], Any] | None:
        """Stop taking frames; the worker's ``stop`` to call, or None (quick stop, or it has none)."""
        global _stop_deadline
        logger.debug("worker %d stopping: %s", self._slot, self._stop_reason)
        _stop_deadline = time.monotonic() + self._graceful_timeout
        self._close_listeners()
        if self._accepted and not self._master_lost:
            with contextlib.suppress(OSError):
                self._sweep()
                self._channel.flush()
        self._reader.close()
        self._channel.close()
        stop = None if self._quick else getattr(self._worker, "stop", None)
        return stop if callable(stop) else None

    def _end(self) -> None:
        if not self._master_lost:
            self._control.close()
