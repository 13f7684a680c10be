"""The dispatcher: the master's single-threaded event loop.

Theory of operation
-------------------
The loop and nothing else. It runs the master's parts on one thread and carries out
what they return: the ``acceptor`` accepts (from the listeners it watches), the
``router`` picks a slot for each connection (guarding against a faulty balancer) and
parks what no slot can take, ``traffic`` reads, handles and writes the workers'
control sockets (each worker's conditions are its ``link``'s), the ``supervisor``
decides the workers' lifecycle (the loop tells it events and carries out its
decisions), ``intake`` reads a proxy header, and on the kernel path the
``SteeringKeeper`` keeps the program to the alive slots. No part calls back into the
loop: each returns what the loop must do next, or marks the router dirty, and at the
end of each pass the loop routes what is parked, writes one frame per worker and
settles (the kernel program follows the alive set; the acceptor watches what it
should).

One selector watches the listening sockets, every worker's control socket and the
signal wake-up socket; the supervisor's deadlines (restarts, heartbeats, kills),
accept pauses and full-worker checks are deadlines for ``select``. Nothing in the
loop blocks on a client or on a worker. Nothing in it runs long either: a worker's
frames and the calls other threads queue (sends) are handled ``slices.SLICE_SECONDS``
at a time, and while some wait the loop polls instead of sleeping, so accepts and
hand-offs get a turn between slices.

The rules below are named "master rule N" elsewhere; each is carried out by the part named.

Master rule 1 (ownership; ``traffic``): an accepted descriptor belongs to the master until the
``sendmsg`` that carries it to its worker succeeds (a HANDOFF frame; batched: one
frame per worker per pass of the loop); then the master closes its copy, and the
connection is the worker's once it reads the frame. The master keeps the worker's
end of every control socket open too (``WorkerProcess.worker_end``), so a hand-off
the worker has not read stays in that socket whatever becomes of the worker. No
acknowledgement travels back: it would cost the worker a write and the master a
wake-up, a read and, often, the connection's final close (the worker's close is not
the last while the master holds a copy) for every batch.

Master rule 2 (no loss; ``traffic``): when a worker's process exits, the master first reads everything
it still sent (its last messages), then reads back what is left in the worker's
end of its control socket and routes every hand-off the worker never read again,
to the balancer's choice among the remaining slots (``Outbox.unread_hand_offs``
pairs the descriptors read back with their frames). Nobody read a byte of those
connections, so their streams are intact. Hand-offs not sent yet are routed again
as soon as the worker's link closes. A worker that dies after reading a hand-off
takes that connection with it, as it would a connection it was serving.

Master rule 3 (back-pressure; ``link``, ``traffic``): a worker with ``MAX_QUEUED`` connections routed to it and
not read yet (waiting in the master, or in its socket) is full and leaves the alive
set until that is down to half; its clients go to their next choice meanwhile. The
master counts what waits in the socket from its record of sent frames and the
socket's unread byte count (``FIONREAD``): it asks the kernel only when the count
since it last asked reaches ``MAX_QUEUED``, and every ``FULL_CHECK_INTERVAL`` while
a worker is full (a worker says nothing when it reads). If no slot can take a
connection, the master stops accepting (the kernel's backlog holds new clients) and
parks the connections it has until a slot can take them. Nothing is closed for lack of room.

Master rule 4 (one current worker per slot; ``supervisor``): routing only ever uses a slot's *current*
worker. A reload or a recycle starts a replacement beside it, makes it current
when it is ready, and only then sends the old one STOP (after every hand-off
already queued for it), so the slot never stops serving and keeps its clients.

Master rule 5 (stop; this loop): graceful (SIGTERM) closes the listeners and sends each worker
STOP after the hand-offs queued for it, so everything accepted is served, then
SIGKILLs what is left ``graceful_timeout`` seconds later. Quick (SIGINT,
SIGQUIT) sends the workers SIGQUIT and kills them ``QUICK_STOP_SECONDS`` later.
Any further stop signal kills at once.

Master rule 6 (descriptor room; ``link``): a worker tells its descriptor limit when it is ready;
the master treats it as full once it has ``limit - reserve`` live connections
(``descriptor_headroom``), and routes its clients elsewhere until some close. If a
worker still runs out (its own files count too), the kernel closes the hand-offs
it had no room for, the worker keeps the rest and says how many it lost (NO_ROOM),
and the master lowers that worker's ceiling to what it holds.

Master rule 7 (kernel path, ``steering``; ``steering.keeper``): the master holds every
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
a worker's frames kills that worker, which is replaced (``traffic``). Running out of
descriptors pauses accepting (``acceptor``). Any other error is a fault in the
master's own state: it propagates, and the ``finally`` of ``run`` kills every worker so nothing is left behind.
"""

from __future__ import annotations

import functools
import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ..balancer import Balancer, ClientInfo
from ..errors import WorkerBootError
from ..listener import ACCEPT_BURST, format_address
from ..protocol.frames import FrameKind
from ..protocol.messages import DEFAULT_MAX_MESSAGE_SIZE
from ..proxy import ClientAddressSettings
from ..sessions import SessionBalancer
from ..steering import KernelSteering
from ..steering.keeper import SteeringKeeper
from ..util.signals import SignalQueue
from .acceptor import Acceptor, Local, listening_address
from .calls import ThreadCalls
from .decisions import Connect, Decision, Halt, Listening, Ping, SendStop, StopMode
from .hooks import Hooks, run_hooks
from .intake import Intake
from .messages import MessageRouter
from .route_notices import RouteNotices
from .router import Router
from .stats import collect, log_stats
from .supervisor import Supervisor
from .traffic import Traffic

__all__ = ["Dispatcher", "Hooks", "StopMode"]

logger = logging.getLogger("sticky_server.master")

# A graceful stop accepts at most this many connections still in each listener's backlog.
MAX_STOP_DRAIN = 65536


class Dispatcher:
    """The master's loop: runs its parts and carries out what they return (module docstring)."""

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
        self._supervisor = supervisor
        self._steering = steering
        self._on_ready = on_ready
        self._hooks = hooks = hooks or Hooks()
        # What each bind is bound to (the log says it) and ClientInfo.local of its connections.
        self._bound: list[Any] = (
            [group.address for group in steering.groups]
            if steering is not None
            else [listener.getsockname() for listener in listeners]
        )
        listening = [listening_address(name) for name in self._bound]
        self._keeper = SteeringKeeper(steering, listening) if steering is not None else None
        self._selector = selectors.DefaultSelector()
        self._acceptor = Acceptor(self._selector, listeners, self._keeper, listening, self._on_listener)
        self._router = Router(supervisor, balancer)
        self._traffic = Traffic(
            self._selector,
            supervisor,
            self._router,
            hooks=hooks,
            listening=listening,
            addressed=client_addresses is not None and client_addresses.names_clients,
            unpackable=lambda entry, error: self._acceptor.failed(entry[1], entry[2], error),
            kernel_path=steering is not None,
            max_message_size=max_message_size,
            sessions=balancer if steering is not None and isinstance(balancer, SessionBalancer) else None,
            max_connections_per_worker=max_connections_per_worker,
            max_connections_jitter=max_connections_jitter,
        )
        self.messages: MessageRouter = self._traffic.messages
        self._intake = (
            Intake(self._selector, client_addresses, self._route, self._acceptor.failed) if client_addresses else None
        )
        self._followed = -1  # the router's generation the kernel's program last followed
        # Kernel path with route_by: the workers sort what they accept, told the alive set and the bound.
        self._notices = (
            RouteNotices(self._router, self._traffic, balancer)
            if steering is not None and isinstance(balancer, SessionBalancer)
            else None
        )
        self._stops_wait_for_intake = False
        self._boot_error: WorkerBootError | None = None
        self._calls = ThreadCalls()
        self.call_soon_threadsafe = self._calls.call_soon_threadsafe
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
        calls = self._calls
        self._selector.register(calls.waker.fileno(), selectors.EVENT_READ, calls.run)
        calls.loop_thread = threading.get_ident()
        supervisor, traffic = self._supervisor, self._traffic
        try:
            self._carry_out(supervisor.boot())
            while not (supervisor.stopping and not supervisor.processes):
                for link in list(traffic.busy):  # before select: one slice per link per turn
                    traffic.read(link)
                if calls.backlog:
                    calls.run()
                for key, mask in self._selector.select(self._select_timeout()):
                    key.data(mask)
                self._run_timers()
                if self._stops_wait_for_intake and not (self._intake and self._intake.waiting):
                    self._stops_wait_for_intake = False
                    self._carry_out(supervisor.stop_workers())
                self._flush()
        finally:
            self._selector.unregister(calls.waker.fileno())
            calls.close()
            self._shut_down()
            self._selector.unregister(signals.fileno())
            signals.restore()
        if self._boot_error is not None:
            raise self._boot_error

    def _select_timeout(self) -> float | None:
        if self._traffic.busy or self._calls.backlog:
            return 0.0  # only look for accepts and hand-offs, then go on with the frames
        earliest = self._supervisor.next_deadline
        for deadline in (
            self._acceptor.paused_until,
            self._traffic.next_full_check,
            self._keeper.next_check if self._keeper is not None else None,
            self._notices.next_due if self._notices is not None else None,
            self._intake.next_deadline() if self._intake else None,
        ):
            if deadline is not None and (earliest is None or deadline < earliest):
                earliest = deadline
        if earliest is None:
            return None
        return max(0.0, earliest - time.monotonic())

    def _run_timers(self) -> None:
        now = time.monotonic()
        decisions = self._supervisor.due(now, self._traffic.last_heard)
        if decisions is not None:
            self._carry_out(decisions)
        self._acceptor.pause_over(now)
        traffic = self._traffic
        if traffic.next_full_check is not None and traffic.next_full_check <= now:
            traffic.check_full(now)
        keeper = self._keeper
        if keeper is not None and keeper.next_check is not None and keeper.next_check <= now:
            self._check_steering(keeper, now)
        notices = self._notices
        if notices is not None and notices.next_due is not None and notices.next_due <= now:
            notices.tell()
        if self._intake is not None:
            self._intake.expire(now)

    def _flush(self) -> None:
        """End of a pass: carry out what the parts decided, route what is parked (if a slot can take it now),
        send what is queued (one frame per worker), settle.

        A flush that finds a worker gone parks what it owed; the next round routes
        those to the other slots and sends them. Each round closes a link at most
        once, so this ends.
        """
        traffic, router = self._traffic, self._router
        while True:
            decisions = traffic.take_decisions()
            if decisions:
                self._carry_out(decisions)
            for fd, family, client in traffic.take_moved():
                self._take(self._acceptor.number(), fd, family, client)
            if router.parked and router.alive:
                self._route_parked()
            if not traffic.touched:
                break
            traffic.flush_touched()
        self._settle()

    def _settle(self) -> None:
        """The kernel's program follows the alive set; the acceptor watches what the master accepts from now."""
        supervisor, router = self._supervisor, self._router
        alive = router.workers.alive
        # (until every slot's first worker is ready the program includes them all; stopping, it stays)
        keeper = self._keeper
        following = supervisor.started and not supervisor.stopping
        if keeper is not None and following and router.generation != self._followed:
            keeper.follow(alive)
            self._followed = router.generation
            if self._notices is not None:
                self._notices.tell()
        self._acceptor.accept_while(not supervisor.stopping and bool(alive) and not router.parked)

    # --- the supervisor's decisions ---------------------------------------------

    def _carry_out(self, decisions: list[Decision]) -> None:
        for decision in decisions:
            match decision:
                case Connect(worker=worker):
                    self._traffic.add(worker)
                case SendStop(worker=worker):
                    self._traffic.put(worker, FrameKind.STOP)  # after the hand-offs routed this pass
                case Ping(worker=worker):
                    self._traffic.put(worker, FrameKind.PING)
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
        self._router.mark_dirty()

    def _reap(self) -> None:
        for worker, returncode in self._supervisor.reap():
            self._traffic.drain_and_close(worker)
            self._carry_out(self._traffic.take_decisions())  # (from its last frames)
            run_hooks(self._hooks.worker_exit, worker.slot, returncode)
            self._carry_out(self._supervisor.exited(worker, returncode))

    def _stop(self, why: str, mode: StopMode) -> None:
        supervisor, router = self._supervisor, self._router
        first = not supervisor.stopping
        supervisor.stop(why, mode)  # (a second stop kills the workers now: nothing more to do here)
        router.mark_dirty()
        if not first:
            return
        if router.parked and router.alive:
            self._route_parked()
        self._acceptor.accept_while(False)
        for listener, local in self._acceptor.every_listener():
            if mode is StopMode.GRACEFUL and router.workers.alive:
                # Clients whose handshake the kernel completed are served, not reset (master rule 5). On the
                # kernel path a worker takes what reaches its own listener after this (worker side).
                for conn_id, fd, client in self._acceptor.accept(listener, local, MAX_STOP_DRAIN):
                    self._route(conn_id, fd, client)
            listener.close()
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

    def _close_parked(self, why: str) -> None:
        parked = self._router.parked
        if parked:
            logger.warning("closing %d accepted connection(s) no worker could take: %s", len(parked), why)
        while parked:
            _, fd, _ = parked.popleft()
            os.close(fd)

    def _shut_down(self) -> None:
        """Leave nothing behind: no worker process, no descriptor (runs on every exit of ``run``)."""
        for worker in self._supervisor.shut_down():
            if worker not in self._router.links:  # never linked (the OS refused a later slot at boot)
                worker.control.close()
        self._traffic.close_all()
        if self._intake is not None:
            self._intake.close_all("the server stopped")
        self._close_parked("the server stopped")
        self._acceptor.close()

    # --- calls from other threads, signals --------------------------------------

    def _on_signals(self, signals: SignalQueue) -> None:
        for signum in signals.drain():
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                handler()

    # --- accepting and routing --------------------------------------------------

    def _on_listener(self, listener: socket.socket, local: Local, mask: int) -> None:
        acceptor, router, intake = self._acceptor, self._router, self._intake
        if not acceptor.accepting:
            return
        for conn_id, fd, client in acceptor.accept(listener, local, ACCEPT_BURST):
            if intake is None:
                self._route(conn_id, fd, client)
            else:
                intake.take(conn_id, fd, listener.family, client)  # (its own errors close only this one)
            if router.parked:
                break  # no slot takes connections now: the rest wait in the kernel's backlog

    def _take(self, conn_id: int, fd: int, family: int, client: ClientInfo) -> None:
        """Route a connection, through the intake when it reads heads first."""
        if self._intake is None:
            self._route(conn_id, fd, client)
        else:
            self._intake.take(conn_id, fd, family, client)

    def _route(self, conn_id: int, fd: int, client: ClientInfo) -> None:
        link = self._router.route((conn_id, fd, client))
        if link is not None:
            self._traffic.routed(link)

    def _route_parked(self) -> None:
        """Route the parked connections, oldest first (those no slot takes stay parked, in order)."""
        router = self._router
        parked, router.parked = router.parked, deque()
        for entry in parked:
            self._route(*entry)

    # --- the kernel path (master rule 7) -------------------------------------------------

    def _check_steering(self, keeper: SteeringKeeper, now: float) -> None:
        """Backed-up slots, and broken listeners replaced with their workers (``steering.keeper``)."""
        if self._supervisor.stopping:  # the listeners are closed or drained by the stop
            keeper.stop_checking()
            return
        checked = keeper.check(now, self._router.current)
        if checked.replace:
            self._acceptor.accept_while(False)  # their old sockets are closed: nothing of theirs stays watched
        for slot in checked.replace:
            self._carry_out(self._supervisor.replace(slot, "its listener stopped listening"))
        if checked.changed:
            self._router.mark_dirty()

    def _grow(self) -> None:
        """SIGTTIN (on the kernel path, unless a socket not ours is in a group: ``refuse_growth``)."""
        refused = self._keeper.refuse_growth() if self._keeper is not None else None
        if refused is not None:
            logger.error("SIGTTIN refused: %s", refused)
            return
        self._carry_out(self._supervisor.grow())

    # --- stats ------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Live figures (README, Stats); call on the loop's thread."""
        steering = "kernel" if self._steering is not None else "master"
        traffic = self._traffic
        return collect(self._supervisor, self._router.current, traffic.counters, self._acceptor.accepted, steering)

    def stats_from_any_thread(self, timeout: float = 1.0) -> dict[str, Any]:
        """``stats()``, asked of the loop from any thread (TimeoutError if it does not answer in ``timeout``)."""
        return self._calls.ask(self.stats, timeout)

    def _dump_stats(self) -> None:
        figures = self.stats()
        log_stats(figures)
        run_hooks(self._hooks.stats, figures)
