"""The dispatcher: the master's single-threaded event loop.

Theory of operation
-------------------
The loop and nothing else: it accepts, picks a slot for each connection (guarding
against a faulty balancer), parks what no slot can take, and flushes each worker's
link once per pass. What it carries out is decided elsewhere: each worker's
traffic and what it owes by its ``link.Link``, the workers' lifecycle by
``supervisor.Supervisor`` (the loop tells it events and carries out its
decisions), messages by ``channel.MessageRouter``, a proxy header by ``intake``.

One selector watches the listening sockets, every worker's control socket and the
signal wake-up socket; the supervisor's deadlines (restarts, heartbeats, kills),
accept pauses and full-worker checks are deadlines for ``select``. Nothing in the
loop blocks on a client or on a worker. Nothing in it runs long either: a worker's
frames and the calls other threads queue (sends) are handled ``slices.SLICE_SECONDS``
at a time, and while some wait the loop polls instead of sleeping, so accepts and
hand-offs get a turn between slices.

Rule 1 (ownership): an accepted descriptor belongs to the master until the
``sendmsg`` that carries it to its worker succeeds (a HANDOFF frame; batched: one
frame per worker per pass of the loop); then the master closes its copy, and the
connection is the worker's once it reads the frame. The master keeps the worker's
end of every control socket open too (``WorkerProcess.worker_end``), so a hand-off
the worker has not read stays in that socket whatever becomes of the worker. No
acknowledgement travels back: it would cost the worker a write and the master a
wake-up, a read and, often, the connection's final close (the worker's close is not
the last while the master holds a copy) for every batch.

Rule 2 (no loss): when a worker's process exits, the master first reads everything
it still sent (its last messages), then reads back what is left in the worker's
end of its control socket and routes every hand-off the worker never read again,
to the balancer's choice among the remaining slots (``Outbox.unread_hand_offs``
pairs the descriptors read back with their frames). Nobody read a byte of those
connections, so their streams are intact. Hand-offs not sent yet are routed again
as soon as the worker's link closes. A worker that dies after reading a hand-off
takes that connection with it, as it would a connection it was serving.

Rule 3 (back-pressure): a worker with ``MAX_QUEUED`` connections routed to it and
not read yet (waiting in the master, or in its socket) is full and leaves the alive
set until that is down to half; its clients go to their next choice meanwhile. The
master counts what waits in the socket from its record of sent frames and the
socket's unread byte count (``FIONREAD``): it asks the kernel only when the count
since it last asked reaches ``MAX_QUEUED``, and every ``FULL_CHECK_INTERVAL`` while
a worker is full (a worker says nothing when it reads). If no slot can take a
connection, the master stops accepting (the kernel's backlog holds new clients) and
parks the connections it has until a slot can take them. Nothing is closed for lack of room.

Rule 4 (one current worker per slot): routing only ever uses a slot's *current*
worker. A reload or a recycle starts a replacement beside it, makes it current
when it is ready, and only then sends the old one STOP (after every hand-off
already queued for it), so the slot never stops serving and keeps its clients.

Rule 5 (stop): graceful (SIGTERM) closes the listeners and sends each worker
STOP after the hand-offs queued for it, so everything accepted is served, then
SIGKILLs what is left ``graceful_timeout`` seconds later. Quick (SIGINT,
SIGQUIT) sends the workers SIGQUIT and kills them ``QUICK_STOP_SECONDS`` later.
Any further stop signal kills at once.

Rule 6 (descriptor room): a worker tells its descriptor limit when it is ready;
the master treats it as full once it has ``limit - reserve`` live connections
(``descriptor_headroom``), and routes its clients elsewhere until some close. If a
worker still runs out (its own files count too), the kernel closes the hand-offs
it had no room for, the worker keeps the rest and says how many it lost (NO_ROOM),
and the master lowers that worker's ceiling to what it holds.

Rule 7 (kernel path, ``steering``; kept by ``steering.keeper``): the master holds every
slot's listener but accepts only from those the kernel's program leaves out. The program includes the
alive slots: there the supervisor routes to READY workers only (a starting one's
clients go to their next choice) and the link must take connections; a slot is also *backed up* when its listeners hold
``BACKED_UP_QUEUE`` connections at two looks ``QUEUE_CHECK_INTERVAL`` apart and no
fewer at the second, until its worker is heard from again. What the master accepts
there it routes as above, with the IP hash over the same alive slots, so a client
goes where the program would send it. Until every slot's first worker is ready the
program includes every slot (each worker takes its own clients as it starts).
Workers report what they accepted (ACCEPTED); that counts as handed off and live.

Error handling: nothing one client or one worker sends ends the master. An
unexpected exception while reading one connection's proxy header or packing its
client address closes that connection and is logged (throttled); one while handling
a worker's frames kills that worker, which is replaced. Out-of-descriptor errors
from ``accept`` (EMFILE, ENFILE, ENOBUFS, ENOMEM) are logged (at most every
``ACCEPT_ERROR_LOG_INTERVAL`` seconds) and accepting pauses for ``ACCEPT_BACKOFF``
seconds instead of spinning; a connection aborted before ``accept`` is skipped.
Any other error is a fault in the master's own state: it propagates, and the
``finally`` of ``run`` kills every worker so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import selectors
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from .balancer import Balancer, ClientInfo
from .channel import DEFAULT_MAX_MESSAGE_SIZE, MessageRouter
from .errors import ProtocolError, WorkerBootError
from .frames import Frame, FrameKind, unpack_count
from .hooks import Hooks, run_hooks
from .intake import ClientAddressSettings, Intake
from .link import MAX_QUEUED, Link, Owed, descriptor_headroom, owed_in
from .listener import ACCEPT_BACKOFF, ACCEPT_BURST, OutOfDescriptors, accept_waiting, format_address
from .process import WorkerProcess
from .router import Router
from .signals import SignalQueue
from .slices import SLICE_SECONDS, run_for
from .stats import SlotCounters, collect, log_stats
from .steering import KernelSteering
from .steering.keeper import SteeringKeeper
from .supervisor import Connect, Decision, Halt, Listening, Ping, SendStop, StopMode, Supervisor
from .throttle import ThrottledLog
from .waker import Waker
from .wire import read_back

__all__ = ["ACCEPT_BACKOFF", "ACCEPT_BURST", "MAX_QUEUED", "Dispatcher", "Hooks", "StopMode"]

logger = logging.getLogger("sticky_server.master")

# Running out of descriptors is logged at most once per this many seconds.
ACCEPT_ERROR_LOG_INTERVAL = 10.0
# How often the master looks whether a full worker has caught up (it says nothing when it reads).
FULL_CHECK_INTERVAL = 0.05
# How many reads of a dead worker's socket at most (each reads up to 256 KiB).
MAX_DRAIN_READS = 64
# max_connections_per_worker is raised by up to this fraction, per worker, at random,
# so that workers started together are not all recycled at once.
RECYCLE_JITTER = 0.1
# Connections that failed in routing, and workers at their descriptor ceiling, are
# logged at most once per this many seconds.
FAULT_LOG_INTERVAL = 10.0
# A graceful stop accepts at most this many connections still in each listener's backlog.
MAX_STOP_DRAIN = 65536


def _listening_address(name: Any) -> tuple[str, int]:
    """``ClientInfo.local`` for connections that come in on a listener bound to ``name``."""
    return name[:2] if isinstance(name, tuple) else (name, 0)  # a Unix socket: its path


def _call(call: Callable[[], None]) -> None:
    call()


class Dispatcher:
    """Accepts, routes and hands off connections; carries out the supervisor's decisions."""

    def __init__(
        self,
        listeners: Sequence[socket.socket],
        supervisor: Supervisor,
        balancer: Balancer,
        *,
        max_connections_per_worker: int | None = None,
        max_connections_jitter: int | None = None,
        on_ready: Callable[[], None] | None = None,
        hooks: Hooks | None = None,
        client_addresses: ClientAddressSettings | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        steering: KernelSteering | None = None,
    ) -> None:
        self._steering = steering
        # What each bind is bound to (the log says it) and ClientInfo.local of its connections.
        self._bound: list[Any] = (
            [group.address for group in steering.groups]
            if steering is not None
            else [listener.getsockname() for listener in listeners]
        )
        self._listening = [_listening_address(name) for name in self._bound]
        # The listeners the master accepts from while it accepts: every bind's, on the master
        # path; on the kernel path those of the slots the program leaves out (rule 7).
        self._own_listeners: dict[socket.socket, tuple[str, int]] = (
            {} if steering is not None else dict(zip(listeners, self._listening, strict=True))
        )
        self._keeper = SteeringKeeper(steering, self._listening) if steering is not None else None
        self._watched: set[socket.socket] = set()  # registered in the selector now
        self._supervisor = supervisor
        self._max_connections = max_connections_per_worker
        self._max_connections_jitter = max_connections_jitter
        self._on_ready = on_ready
        self._hooks = hooks or Hooks()
        self._calls: deque[Callable[[], None]] = deque()  # from other threads, under _calls_lock
        self._call_backlog: deque[Callable[[], None]] = deque()  # taken from _calls, not yet run
        self._calls_lock = threading.Lock()
        self._waker = Waker()
        self._loop_thread: int | None = None
        self._accept_error_log = ThrottledLog(
            logger,
            logging.ERROR,
            "accept failed %d time(s): %s; pausing accepts for %.1f s each time; "
            "raise the descriptor limit (`ulimit -n`)",
            ACCEPT_ERROR_LOG_INTERVAL,
        )
        self._connection_fault_log = ThrottledLog(
            logger,
            logging.ERROR,
            "closed %d connection(s) that could not be routed (latest from %s: %s)",
            FAULT_LOG_INTERVAL,
        )
        self._no_room_log = ThrottledLog(
            logger,
            logging.WARNING,
            "%d time(s) a worker reached its descriptor ceiling (latest: worker %d, %d live connections, "
            "limit %d); its clients go to other workers until some close. Raise the workers' limit "
            "(`ulimit -n`, LimitNOFILE= under systemd)",
            FAULT_LOG_INTERVAL,
        )
        self._selector = selectors.DefaultSelector()
        self._links: dict[WorkerProcess, Link] = {}  # every live process's link
        self._router = Router(supervisor, balancer)
        self._touched: set[Link] = set()  # links with something queued this pass
        self._busy: dict[Link, None] = {}  # links with unhandled frames, in order
        self._next_id = 0
        self._counters = SlotCounters()
        self._accepting = False
        self._accept_paused_until: float | None = None
        self._next_full_check: float | None = None
        self._boot_error: WorkerBootError | None = None
        self._intake = (
            Intake(self._selector, client_addresses, self._route, self._connection_failed) if client_addresses else None
        )
        self._stops_wait_for_intake = False
        self.messages = MessageRouter(
            self._router.current,
            self._touched,
            lambda slot, message: run_hooks(self._hooks.message, slot, message),
            max_message_size,
        )
        self._frame_handlers: dict[FrameKind, Callable[[Link, Frame], None]] = {
            FrameKind.READY: self._on_ready_frame,
            FrameKind.PONG: lambda link, frame: None,  # any frame counts as a heartbeat
            FrameKind.SEND: self.messages.on_send,
            FrameKind.PUBLISH: self.messages.on_publish,
            FrameKind.CLOSED: self._on_closed,
            FrameKind.NO_ROOM: self._on_no_room,
            FrameKind.ACCEPTED: self._on_accepted,
        }
        self._signal_handlers: dict[int, Callable[[], None]] = {
            signal.SIGTERM: functools.partial(self._stop, "SIGTERM", StopMode.GRACEFUL),
            signal.SIGINT: functools.partial(self._stop, "SIGINT", StopMode.QUICK),
            signal.SIGQUIT: functools.partial(self._stop, "SIGQUIT", StopMode.QUICK),
            signal.SIGHUP: lambda: self._carry_out(self._supervisor.reload()),
            signal.SIGTTIN: self._grow,
            signal.SIGTTOU: lambda: self._carry_out(self._supervisor.shrink()),
            signal.SIGCHLD: self._reap,
            signal.SIGUSR1: self._dump_stats,
        }

    @property
    def size(self) -> int:
        """How many worker slots there are now."""
        return self._supervisor.size

    # --- the loop -------------------------------------------------------------

    def run(self) -> None:
        """Start the workers and serve until stopped; raises WorkerBootError if workers cannot start."""
        signals = SignalQueue(self._signal_handlers)
        if not signals.installed:
            signals.restore()
            raise RuntimeError("listen() must run in the main thread: the master handles signals there")
        self._selector.register(signals.fileno(), selectors.EVENT_READ, lambda mask: self._on_signals(signals))
        self._selector.register(self._waker.fileno(), selectors.EVENT_READ, self._run_calls)
        self._loop_thread = threading.get_ident()
        supervisor = self._supervisor
        try:
            self._carry_out(supervisor.boot())
            while not (supervisor.stopping and not supervisor.processes):
                for link in list(self._busy):  # before select: one slice per link per turn
                    self._read_link(link)
                if self._call_backlog:
                    self._run_calls()
                for key, mask in self._selector.select(self._select_timeout()):
                    key.data(mask)
                self._run_timers()
                if self._stops_wait_for_intake and not (self._intake and self._intake.waiting):
                    self._stops_wait_for_intake = False
                    self._carry_out(supervisor.stop_workers())
                self._flush()
        finally:
            self._loop_thread = None
            self._shut_down()
            self._selector.unregister(signals.fileno())
            self._selector.unregister(self._waker.fileno())
            self._waker.close()
            signals.restore()
        if self._boot_error is not None:
            raise self._boot_error

    def _select_timeout(self) -> float | None:
        if self._busy or self._call_backlog:
            return 0.0  # only look for accepts and hand-offs, then go on with the frames
        earliest = self._supervisor.next_deadline
        for deadline in (
            self._accept_paused_until,
            self._next_full_check,
            self._keeper.next_check if self._keeper is not None else None,
            self._intake.next_deadline() if self._intake else None,
        ):
            if deadline is not None and (earliest is None or deadline < earliest):
                earliest = deadline
        if earliest is None:
            return None
        return max(0.0, earliest - time.monotonic())

    def _run_timers(self) -> None:
        now = time.monotonic()
        decisions = self._supervisor.due(now, self._last_heard)
        if decisions is not None:
            self._carry_out(decisions)
        changed = False
        if self._accept_paused_until is not None and self._accept_paused_until <= now:
            self._accept_paused_until = None
            changed = True
        if self._next_full_check is not None and self._next_full_check <= now:
            changed |= self._check_full(now)
        keeper = self._keeper
        if keeper is not None and keeper.next_check is not None and keeper.next_check <= now:
            changed |= self._check_steering(keeper, now)
        if self._intake is not None:
            self._intake.expire(now)
        if changed:
            self._workers_changed()

    def _flush(self) -> None:
        """Route what is parked (if a slot can take it now), then send what is queued: one frame per worker.

        A flush that finds a worker gone parks what it owed; the next round routes
        those to the other slots and sends them. Each round closes a link at most
        once, so this ends.
        """
        touched = self._touched
        while True:
            if self._router.parked and self._router.alive:
                self._route_parked()
            if not touched:
                return
            links = list(touched)
            touched.clear()
            for link in links:
                if link.connected:
                    link.frame_pending(self._intake is not None, self._unpackable)
                    self._flush_link(link)

    # --- the supervisor's decisions ---------------------------------------------

    def _carry_out(self, decisions: list[Decision]) -> None:
        for decision in decisions:
            match decision:
                case Connect(worker=worker):
                    self._add_link(worker)
                case SendStop(worker=worker):
                    link = self._links.get(worker)
                    if link is not None and link.connected:
                        link.frame_pending(self._intake is not None, self._unpackable)  # routed this pass: first
                        link.outbox.put(FrameKind.STOP)
                        self._flush_link(link)
                case Ping(worker=worker):
                    link = self._links.get(worker)
                    if link is not None and link.connected:
                        link.outbox.put(FrameKind.PING)
                        self._flush_link(link)
                case Listening():
                    addresses = ", ".join(format_address(name) for name in self._bound)
                    logger.info(
                        "listening on %s with %d workers (master pid %d) on the %s path",
                        addresses,
                        self.size,
                        os.getpid(),
                        "kernel" if self._steering is not None else "master",
                    )
                    if self._on_ready is not None:
                        self._on_ready()
                case Halt(error=error):
                    if self._boot_error is None:
                        self._boot_error = error
                    self._stop("workers cannot start", StopMode.KILL)
        self._workers_changed()

    def _last_heard(self, worker: WorkerProcess) -> float | None:
        link = self._links.get(worker)
        return link.last_heard if link is not None and link.connected else None

    def _reap(self) -> None:
        for worker, returncode in self._supervisor.reap():
            link = self._links.pop(worker)
            for _ in range(MAX_DRAIN_READS):  # its last messages
                if not link.connected or not self._read_link(link, seconds=None):
                    break
            self._disconnect(link)
            self._read_back(link)
            run_hooks(self._hooks.worker_exit, worker.slot, returncode)
            self._carry_out(self._supervisor.exited(worker, returncode))
        self._workers_changed()

    def _stop(self, why: str, mode: StopMode) -> None:
        supervisor = self._supervisor
        first = not supervisor.stopping
        supervisor.stop(why, mode)  # (a second stop kills the workers now: nothing more to do here)
        if not first:
            return
        if self._router.parked and self._router.alive:
            self._route_parked()
        self._watch({})
        for listener, local in self._every_listener():
            if mode is StopMode.GRACEFUL and self._router.workers.alive:
                # Clients whose handshake the kernel completed are served, not reset (rule 5). On the
                # kernel path a worker takes what reaches its own listener after this (worker.py).
                self._accept_from(listener, local, MAX_STOP_DRAIN)
            listener.close()
        self._accepting = False
        self._close_parked("the server is stopping")
        if self._intake is not None and mode is not StopMode.GRACEFUL:
            self._intake.close_all("the server is stopping")
        if mode is StopMode.GRACEFUL:
            if self._intake is not None and self._intake.waiting:
                # Accepted connections still sending their header are served too: the
                # workers get STOP once those are routed or timed out (header_timeout).
                self._stops_wait_for_intake = True
            else:
                self._carry_out(supervisor.stop_workers())
        self._workers_changed()

    def _close_parked(self, why: str) -> None:
        if self._router.parked:
            logger.warning("closing %d accepted connection(s) no worker could take: %s", len(self._router.parked), why)
        while self._router.parked:
            _, fd, _ = self._router.parked.popleft()
            os.close(fd)

    def _shut_down(self) -> None:
        """Leave nothing behind: no worker process, no descriptor (runs on every exit of ``run``)."""
        for worker in self._supervisor.shut_down():
            if worker not in self._links:  # never linked (the OS refused a later slot at boot)
                worker.control.close()
        for link in list(self._links.values()):
            self._disconnect(link)
        for worker in self._links:
            if worker.worker_end is not None:
                worker.worker_end.close()  # the kernel closes what the worker never read
                worker.worker_end = None
        self._links.clear()
        self._workers_changed()
        if self._intake is not None:
            self._intake.close_all("the server stopped")
        self._close_parked("the server stopped")
        self._watch({})
        for listener, _ in self._every_listener():
            listener.close()
        self._accepting = False

    # --- calls from other threads, signals --------------------------------------

    def call_soon_threadsafe(self, call: Callable[[], None]) -> None:
        """Run ``call`` in the master's loop: now if this is the loop's thread, else soon."""
        if self._loop_thread == threading.get_ident():
            call()
            return
        if self._loop_thread is None:
            raise RuntimeError("the master is not serving: send messages once listen() runs (e.g. from on_listening)")
        with self._calls_lock:
            self._calls.append(call)
        self._waker.wake()

    def _run_calls(self, mask: int = 0) -> None:
        """Run calls queued by other threads, in order, for about a slice; the loop comes back for the rest."""
        self._waker.clear()
        with self._calls_lock:
            fresh, self._calls = self._calls, deque()
        self._call_backlog.extend(fresh)
        run_for(self._call_backlog, _call, SLICE_SECONDS)

    def _on_signals(self, signals: SignalQueue) -> None:
        for signum in signals.drain():
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                handler()

    # --- accepting and routing --------------------------------------------------

    def _on_listener(self, listener: socket.socket, local: tuple[str, int], mask: int) -> None:
        if self._accepting:
            self._accept_from(listener, local, ACCEPT_BURST)

    def _accept_from(self, listener: socket.socket, local: tuple[str, int], limit: int) -> None:
        """Accept up to ``limit`` connections waiting on ``listener`` and route each (or give it to the intake)."""
        intake = self._intake
        new_client = tuple.__new__
        try:
            for fd, address in accept_waiting(listener, limit):
                self._next_id += 1
                if type(address) is tuple:
                    # The same tuple ClientInfo(...) builds, without its Python-level __new__.
                    client = new_client(ClientInfo, (address[0], address[1], None, local))
                else:
                    client = ClientInfo("", 0, None, local)
                if intake is None:
                    self._route(self._next_id, fd, client)
                else:
                    intake.take(self._next_id, fd, listener.family, client)  # (its own errors close only this one)
                if not self._accepting and (self._router.parked or not self._supervisor.stopping):
                    break  # (a graceful stop drains the backlog while a slot can take connections)
        except OutOfDescriptors as exc:
            self._pause_accepting(exc)
        except OSError as exc:
            if self._keeper is None:
                raise  # the master's own listener: nothing else can break it
            # A slot's listener, shared with its worker: broken there (rule 7 replaces it).
            logger.debug("accepting on a kernel-path listener failed: %s", exc)
            self._watch({})
            self._keeper.check_soon()

    def _connection_failed(self, fd: int, client: ClientInfo, error: BaseException) -> None:
        """An unexpected error while reading one connection's header or packing its hand-off: close it, log
        (throttled), go on."""
        with contextlib.suppress(OSError):
            os.close(fd)
        self._connection_fault_log.note(1, client.host or "a Unix socket", f"{type(error).__name__}: {error}")
        logger.debug("routing a connection failed", exc_info=error)

    def _unpackable(self, entry: Owed, error: BaseException) -> None:
        self._connection_failed(entry[1], entry[2], error)

    def _pause_accepting(self, exc: OSError) -> None:
        self._accept_error_log.note(1, os.strerror(exc.errno or 0), ACCEPT_BACKOFF)
        self._accept_paused_until = time.monotonic() + ACCEPT_BACKOFF
        self._update_accepting()

    def _route(self, conn_id: int, fd: int, client: ClientInfo) -> None:
        slot = self._router.pick(client)
        if slot is None:
            self._router.parked.append((conn_id, fd, client))
            self._update_accepting()
            return
        link = self._router.current[slot]
        link.owe((conn_id, fd, client))
        self._touched.add(link)
        if link.at_ceiling() and not link.no_room:
            self._out_of_room(link)
        if link.unread() >= MAX_QUEUED and link.unread(ask_kernel=True) >= MAX_QUEUED:
            link.full = True
            if self._next_full_check is None:
                self._next_full_check = time.monotonic() + FULL_CHECK_INTERVAL
            logger.warning(
                "worker %d has %d connections it has not taken yet; routing its clients elsewhere until it catches up",
                slot,
                link.unread(),
            )
            self._workers_changed()

    def _route_parked(self) -> None:
        """Route the parked connections, oldest first (those no slot takes stay parked, in order)."""
        parked, self._router.parked = self._router.parked, deque()
        for conn_id, fd, client in parked:
            self._route(conn_id, fd, client)
        self._update_accepting()

    def _workers_changed(self) -> None:
        """Read the current links from the supervisor and recompute the alive set (parked ones route in ``_flush``)."""
        supervisor = self._supervisor
        alive = self._router.refresh(self._links)
        if self._keeper is not None and supervisor.started and not supervisor.stopping:
            # (until every slot's first worker is ready the program includes them all; stopping, it stays)
            self._keeper.follow(alive)
        self._update_accepting()

    def _check_steering(self, keeper: SteeringKeeper, now: float) -> bool:
        """Rule 7 (``steering.keeper``): backed-up slots, and broken listeners replaced with their workers."""
        if self._supervisor.stopping:  # the listeners are closed or drained by the stop
            keeper.stop_checking()
            return False
        checked = keeper.check(now, self._router.current)
        if checked.replace:
            self._watch({})  # their old sockets are closed: nothing of theirs stays in the selector
        for slot in checked.replace:
            self._carry_out(self._supervisor.replace(slot, "its listener stopped listening"))
        return checked.changed

    def _grow(self) -> None:
        """SIGTTIN (on the kernel path, unless a socket not ours is in a group: ``refuse_growth``)."""
        refused = self._keeper.refuse_growth() if self._keeper is not None else None
        if refused is not None:
            logger.error("SIGTTIN refused: %s", refused)
            return
        self._carry_out(self._supervisor.grow())

    def _update_accepting(self) -> None:
        should = (
            not self._supervisor.stopping
            and bool(self._router.workers.alive)
            and not self._router.parked
            and self._accept_paused_until is None
        )
        self._accepting = should
        self._watch(self._accepted_from() if should else {})

    def _watch(self, listeners: dict[socket.socket, tuple[str, int]]) -> None:
        """Watch exactly ``listeners`` for connections to accept."""
        watched = self._watched
        if len(watched) == len(listeners) and all(listener in listeners for listener in watched):
            return
        for listener in list(watched):
            if listener not in listeners:
                self._selector.unregister(listener)
                watched.discard(listener)
        for listener, local in listeners.items():
            if listener not in watched:
                callback = functools.partial(self._on_listener, listener, local)
                self._selector.register(listener, selectors.EVENT_READ, callback)
                watched.add(listener)

    def _accepted_from(self) -> dict[socket.socket, tuple[str, int]]:
        """The listeners the master accepts from while it accepts: its own, or those rule 7 drains."""
        return self._keeper.drained if self._keeper is not None else self._own_listeners

    def _every_listener(self) -> list[tuple[socket.socket, tuple[str, int]]]:
        """Every listener the master holds, with its bound address."""
        if self._keeper is None:
            return list(self._own_listeners.items())
        return self._keeper.every_listener()

    # --- stats ------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Live figures (README, Stats); call on the loop's thread."""
        steering = "kernel" if self._steering is not None else "master"
        return collect(self._supervisor, self._router.current, self._counters, self._next_id, steering)

    def stats_from_any_thread(self, timeout: float = 1.0) -> dict[str, Any]:
        if self._loop_thread in (None, threading.get_ident()):
            return self.stats()
        answer: list[dict[str, Any]] = []
        done = threading.Event()

        def collect_on_the_loop() -> None:
            answer.append(self.stats())
            done.set()

        self.call_soon_threadsafe(collect_on_the_loop)
        if not done.wait(timeout):
            raise TimeoutError(f"the master's loop did not answer within {timeout} s")
        return answer[0]

    def _dump_stats(self) -> None:
        figures = self.stats()
        log_stats(figures)
        run_hooks(self._hooks.stats, figures)

    # --- worker links -----------------------------------------------------------

    def _add_link(self, worker: WorkerProcess) -> None:
        recycle_after = None
        if self._max_connections:
            jitter = self._max_connections_jitter
            if jitter is None:
                jitter = int(self._max_connections * RECYCLE_JITTER)
            recycle_after = self._max_connections + random.randint(0, jitter)
        now = time.monotonic()
        link = Link(worker, last_heard=now, recycle_after=recycle_after, accepts_reported_at=now)
        self._links[worker] = link
        self._selector.register(worker.control, selectors.EVENT_READ, functools.partial(self._on_control, link))

    def _on_control(self, link: Link, mask: int) -> None:
        # One select() batch can hold an event for a link an earlier callback closed.
        if not link.connected:
            return
        if mask & selectors.EVENT_READ and link not in self._busy:  # a busy link has had its slice
            self._read_link(link)
        if link.connected and mask & selectors.EVENT_WRITE:
            self._flush_link(link)

    def _read_link(self, link: Link, seconds: float | None = SLICE_SECONDS) -> bool:
        """Handle the worker's frames for about ``seconds`` (None: all), reading more once none wait.

        Returns True if it found something to do and the link is still open.
        """
        try:
            closed = False
            if not link.unhandled:
                frames, closed = link.reader.read_from(link.worker.control)
                if frames:
                    link.last_heard = time.monotonic()
                    link.unhandled.extend(frames)
            self._handle_frames(link, seconds)
        except BlockingIOError:
            return False
        except ProtocolError as exc:
            logger.error(
                "worker %d (pid %d) sent an invalid frame (%s); killing it", link.worker.slot, link.worker.pid, exc
            )
            self._kill_for_fault(link)
            return False
        except Exception:
            logger.exception(
                "handling a frame from worker %d (pid %d) failed; killing it", link.worker.slot, link.worker.pid
            )
            self._kill_for_fault(link)
            return False
        if closed:
            self._disconnect(link)
            return False
        return True

    def _kill_for_fault(self, link: Link) -> None:
        """A worker whose frames cannot be handled is killed; reaping replaces it (error handling)."""
        self._supervisor.kill(link.worker)
        self._disconnect(link)

    def _handle_frames(self, link: Link, seconds: float | None) -> None:
        """Handle read frames in order for about ``seconds`` (None: all); a link left with some is busy.

        A worker can send thousands of small messages in one read. Handled a
        slice at a time, with a turn of the loop between slices, they delay
        accepts and other workers' frames by a slice, not by the whole read.
        """
        frames, handlers = link.unhandled, self._frame_handlers
        try:
            run_for(frames, lambda frame: handlers[frame.kind](link, frame), seconds)
        finally:
            if frames:
                self._busy[link] = None
            else:
                self._busy.pop(link, None)

    def _flush_link(self, link: Link) -> None:
        try:
            drained = link.outbox.flush(link.worker.control)
        except OSError:
            # The worker is gone; reaping or the read side will tell how.
            self._disconnect(link)
            return
        self._count_sent(link)
        if drained == link.writing:
            link.writing = not drained
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if link.writing else 0)
            self._selector.modify(link.worker.control, events, functools.partial(self._on_control, link))

    def _count_sent(self, link: Link) -> None:
        """Account for the hand-offs the last flush sent (rule 1: they are the worker's now)."""
        sent = link.count_sent()
        if sent:
            self._took(link, sent)
        if link.full and link.unread() <= MAX_QUEUED // 2:
            link.full = False
            self._workers_changed()

    def _took(self, link: Link, count: int) -> None:
        """``count`` more connections are the worker's: count them, and recycle it once it took its share."""
        slot = link.worker.slot
        handed_off = self._counters.handed_off
        handed_off[slot] = handed_off.get(slot, 0) + count
        took = link.taken + link.accepted
        if link.recycle_after is not None and took >= link.recycle_after and not link.recycling:
            link.recycling = True
            self._carry_out(self._supervisor.replace(slot, f"it took {took} connections (max_connections_per_worker)"))

    def _on_accepted(self, link: Link, frame: Frame) -> None:
        """Kernel path: the worker accepted connections from its own listener; they count as its hand-offs."""
        if self._steering is None:
            raise ProtocolError("ACCEPTED from a worker that has no listener of its own (master path)")
        count = unpack_count(frame)
        link.take_accepted(count, time.monotonic())
        self._counters.accepted_by_workers += count
        self._took(link, count)
        if link.at_ceiling() and not link.no_room:
            self._out_of_room(link)

    def _check_full(self, now: float) -> bool:
        """Rule 3: put full workers that have caught up back in the alive set; True if one was."""
        changed = False
        still_full = False
        for link in list(self._links.values()):
            if link.full and link.connected:
                if link.unread(ask_kernel=True) <= MAX_QUEUED // 2:
                    link.full = False
                    changed = True
                else:
                    still_full = True
        self._next_full_check = now + FULL_CHECK_INTERVAL if still_full else None
        return changed

    def _out_of_room(self, link: Link) -> None:
        """Rule 6: ``link``'s worker is at its descriptor ceiling; route its clients elsewhere until some close."""
        link.no_room = True
        self._no_room_log.note(1, link.worker.slot, link.live, link.descriptor_limit)
        self._workers_changed()

    def _on_ready_frame(self, link: Link, frame: Frame) -> None:
        link.ready()
        link.descriptor_limit = unpack_count(frame) if frame.payload else 0  # empty: no limit known
        link.max_live = descriptor_headroom(link.descriptor_limit)
        worker = link.worker
        logger.debug("worker %d (pid %d) is ready", worker.slot, worker.pid)
        if not self._supervisor.stopping:
            run_hooks(self._hooks.worker_start, worker.slot)
        self._carry_out(self._supervisor.ready(worker))

    def _on_closed(self, link: Link, frame: Frame) -> None:
        self._forget_closed(link, unpack_count(frame))

    def _forget_closed(self, link: Link, count: int) -> None:
        count = link.closed(count)
        slot = link.worker.slot
        if self._router.current.get(slot) is link:
            self._router.balancer.connections_closed(slot, count)
        if link.no_room and link.has_room_again():
            link.no_room = False  # rule 6: back once a tenth of its ceiling has closed
            self._workers_changed()

    def _on_no_room(self, link: Link, frame: Frame) -> None:
        """Rule 6: the worker lost hand-offs at its descriptor limit; its ceiling is what it holds now."""
        lost = unpack_count(frame)
        link.check_lost(lost)
        slot = link.worker.slot
        lost_no_room = self._counters.lost_no_room
        lost_no_room[slot] = lost_no_room.get(slot, 0) + lost
        self._forget_closed(link, lost)
        held = max(1, link.live - link.unread(ask_kernel=True))
        if link.max_live is None or held < link.max_live:
            link.max_live = held
        if link.live >= link.max_live and not link.no_room:
            self._out_of_room(link)

    def _disconnect(self, link: Link) -> None:
        """Close the link and park the connections it held that were not sent yet, to route again (rule 2)."""
        if not link.connected:
            return
        self._selector.unregister(link.worker.control)
        owed = link.close()
        self._busy.pop(link, None)
        self._route_again(link, owed)
        self._workers_changed()
        self._supervisor.lost_control(link.worker)

    def _route_again(self, link: Link, owed: list[Owed]) -> None:
        """Rule 2: park the connections ``link``'s worker never took; ``_flush`` routes them among the others."""
        if owed and not self._supervisor.stopping:
            logger.warning(
                "worker %d (pid %d) went away holding %d connection(s) it had not taken; routing them again",
                link.worker.slot,
                link.worker.pid,
                len(owed),
            )
        link.live = max(0, link.live - len(owed))
        self._router.parked.extend(owed)

    def _client_of(self, fd: int) -> ClientInfo:
        """A connection's client, asked of its socket (for descriptors read back that no frame accounts for)."""
        sock = socket.socket(fileno=fd)
        try:
            peer: Any = sock.getpeername()
            own: Any = sock.getsockname()
        except OSError:  # the client is gone already: whoever gets it sees it closed
            return ClientInfo("", 0)
        finally:
            sock.detach()
        own_port = own[1] if isinstance(own, tuple) else own
        local = next((name for name in self._listening if name[1] == own_port or name[0] == own_port), None)
        if isinstance(peer, tuple):
            return ClientInfo(peer[0], peer[1], None, local)
        return ClientInfo("", 0, None, local)

    def _read_back(self, link: Link) -> None:
        """Rule 2: route again what a gone worker never read; then close the master's copy of its end."""
        worker_end, link.worker.worker_end = link.worker.worker_end, None
        if worker_end is None:
            return
        try:
            unread, fds = read_back(worker_end)
        except ProtocolError as exc:
            logger.error(
                "worker %d (pid %d): %s; its unread connections are lost", link.worker.slot, link.worker.pid, exc
            )
            return
        finally:
            worker_end.close()
        try:
            frames, lost = link.outbox.unread_hand_offs(unread, fds)
        except ProtocolError as exc:
            logger.error(
                "worker %d (pid %d): %s; routing them by their own addresses", link.worker.slot, link.worker.pid, exc
            )
            self._route_again(link, [(0, fd, self._client_of(fd)) for fd in fds])
            return
        if lost:
            logger.warning(
                "worker %d (pid %d) died while reading a hand-off; its %d connection(s) are lost",
                link.worker.slot,
                link.worker.pid,
                lost,
            )
        self._route_again(link, owed_in(frames))
