"""``StickyServer``: the one object a program uses, in the master and in every worker.

The same entry script runs in both. In the master (the process you started),
``is_master`` is True and ``listen()`` binds, starts the workers by running the
script again, and routes connections until stopped. In a worker (started by the
master), ``is_master`` is False and ``work(worker)`` serves what the master sends.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from .balancer import Balancer
from .errors import WrongProcessError
from .listener import DEFAULT_BACKLOG, DEFAULT_UNIX_SOCKET_MODE, Bind, parse_bind, validate_port
from .master.hooks import Hooks
from .master.loop import Dispatcher
from .master.serving import Serving
from .protocol import messages as channel
from .protocol.messages import DEFAULT_MAX_MESSAGE_SIZE
from .sessions import DEFAULT_LOAD_FACTOR, RouteBy
from .settings import (
    DEFAULT_GRACEFUL_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_HEADER_SIZE,
    DEFAULT_TIMEOUT,
    ServerSettings,
    group_id,
    user_id,
)
from .worker.asyncio_loop import AsyncWorkerRuntime
from .worker.base import ConnectionHandler, check_worker, is_async_worker
from .worker.channel import WorkerChannel
from .worker.environment import worker_identity
from .worker.event_loop import run_on_chosen_loop
from .worker.selector_loop import WorkerRuntime
from .worker.session import DEFAULT_STOP_SECONDS, WorkerSession, exit_on_boot_failure
from .working import Runtime, start_runtime

__all__ = [
    "DEFAULT_GRACEFUL_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "StickyServer",
    "current_server",
    "group_id",
    "time_left_to_stop",
    "user_id",
]

logger = logging.getLogger("sticky_server")

_USAGE = "`if sticky.is_master: sticky.listen(port) else: sticky.work(worker)`"

ListeningCallback = Callable[[Any], Any]


class StickyServer:
    """Serve connections from many worker processes, each client always on the same worker.

    ``workers``: how many worker processes (default: the number of CPUs).
    ``balancer``: a ``Balancer`` instance or a built-in name (default ``"ip-hash"``).
    ``graceful_timeout``: seconds workers get to finish when stopping before they are killed.
    ``timeout``: seconds a ready worker may leave the master's heartbeat unanswered before it
    is killed and replaced (None: no heartbeat).
    ``max_connections_per_worker``: replace a worker after it took about this many
    connections (plus up to ``max_connections_jitter`` at random per worker, default
    10% of it, so that workers started together are not all replaced at once); None: never.
    ``user`` / ``group``: run the workers as this user / group (name or id); the
    master keeps its own (e.g. root, to bind port 80).
    ``max_message_size``: the largest channel message, in bytes of JSON (default 1 MiB).
    ``backlog``: the listen backlog (the kernel caps it at its own maximum).
    ``steering``: who puts each connection on its worker. ``"kernel"``: on Linux, with
    the IP-hash balancer and TCP binds, a listener per worker and a BPF program
    computing the IP hash; workers accept their own connections and the master
    only covers for workers that cannot. ``"master"``: the master accepts every
    connection and hands it off. ``"auto"`` (the default): the kernel where it can,
    else the master (logged with the reason). See the README, Kernel steering.

    The real client address behind a proxy (off by default; see the README):
    ``proxy_protocol``: trusted peers send a PROXY protocol v1 or v2 header first;
    the master reads exactly the header and routes by the address in it.
    ``forwarded_header``: route HTTP connections from trusted peers by this request
    header, ``"x-forwarded-for"`` or ``"forwarded"`` (RFC 7239); the master only peeks.
    ``trusted_proxies``: the addresses/networks whose headers are believed
    (default loopback: ``127.0.0.0/8`` and ``::1``; ``"*"`` trusts everyone).
    Other peers are routed by their socket address and nothing is read.
    ``header_timeout`` / ``max_header_size``: a trusted peer that sends no complete,
    valid header within this many seconds / bytes is closed (and logged).
    ``forwarded_header_fallback``: with ``forwarded_header``, a trusted peer that sends
    no HTTP request (other bytes first, or nothing within ``header_timeout``) is
    routed by its own address instead of closed.
    ``route_by``: route HTTP connections by the session their first request names
    instead of by address alone (``"engineio"``, ``"cookie:NAME"``, ``"header:NAME"``,
    ``"query:NAME"``, ``"path:N"``; see the README, Sticky by session); new sessions are
    placed by IP hash with bounded loads (``session_load_factor``, default 0.25).
    ``loop``: the event loop of an asynchronous worker (``work()``): ``"auto"`` is
    uvloop when installed, unless the program set an event loop policy or uvloop would
    show the app other clients (a proxy setting names them; a dual-stack listener's
    IPv4 clients would read ``::ffff:a.b.c.d``); ``"asyncio"``, ``"uvloop"``.
    ``unix_socket_mode``: the file mode of ``unix:`` binds (default ``0o666``, as
    uvicorn: a proxy running as another user, such as nginx's www-data, can connect).
    """

    _current: ClassVar[StickyServer | None] = None  # the first one made in this process (see current_server)

    def __init__(
        self,
        workers: int | None = None,
        *,
        balancer: Balancer | str = "ip-hash",
        graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT,
        timeout: float | None = DEFAULT_TIMEOUT,
        max_connections_per_worker: int | None = None,
        max_connections_jitter: int | None = None,
        user: str | int | None = None,
        group: str | int | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        backlog: int = DEFAULT_BACKLOG,
        proxy_protocol: bool = False,
        forwarded_header: str | None = None,
        trusted_proxies: Iterable[str] | None = None,
        header_timeout: float = DEFAULT_HEADER_TIMEOUT,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        steering: str = "auto",
        forwarded_header_fallback: bool = False,
        unix_socket_mode: int = DEFAULT_UNIX_SOCKET_MODE,
        route_by: str | RouteBy | None = None,
        session_load_factor: float = DEFAULT_LOAD_FACTOR,
        loop: str = "auto",
    ) -> None:
        settings = ServerSettings(
            workers,
            balancer=balancer,
            graceful_timeout=graceful_timeout,
            timeout=timeout,
            max_connections_per_worker=max_connections_per_worker,
            max_connections_jitter=max_connections_jitter,
            user=user,
            group=group,
            max_message_size=max_message_size,
            backlog=backlog,
            proxy_protocol=proxy_protocol,
            forwarded_header=forwarded_header,
            trusted_proxies=trusted_proxies,
            header_timeout=header_timeout,
            max_header_size=max_header_size,
            steering=steering,
            forwarded_header_fallback=forwarded_header_fallback,
            unix_socket_mode=unix_socket_mode,
            route_by=route_by,
            session_load_factor=session_load_factor,
            loop=loop,
        )
        self.settings = settings  # checked and resolved; what every part is built from
        assert settings.workers is not None
        self._workers = settings.workers
        self._hooks = Hooks()
        self._dispatcher: Dispatcher | None = None
        self._identity = worker_identity()
        self._session: WorkerSession | None = None  # this worker's, once it works
        _become_current(self)
        # In a worker, an error before work() is ready is a boot failure (see worker.py).
        self._disarm_boot_hook = exit_on_boot_failure() if self._identity is not None else None
        self._channel = WorkerChannel(self._identity.control) if self._identity is not None else None
        self.addresses: list[Any] = []  # every bound address (a path for a Unix socket), once bound
        self._listening_callbacks: list[ListeningCallback] = []
        self._listen_called = False

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> StickyServer:
        """A StickyServer with ``settings`` (checked already: the command line builds them first)."""
        return cls(**settings.given())

    @property
    def workers(self) -> int:
        """How many worker slots there are: as created, then as SIGTTIN and SIGTTOU change it while serving."""
        return self._workers if self._dispatcher is None else self._dispatcher.size

    @property
    def is_master(self) -> bool:
        """True in the process that was started by hand; False in the workers it spawns."""
        return self._identity is None

    @property
    def worker_id(self) -> int | None:
        """This worker's slot, 0 to ``workers - 1`` (a respawned worker keeps its slot); None in the master."""
        return None if self._identity is None else self._identity.slot

    @property
    def address(self) -> tuple[str, int] | None:
        """The (host, port) the master listens on, once ``listen()`` has bound it; None before and in workers.

        With several binds, the first TCP one (None when all are Unix sockets).
        """
        for address in self.addresses:
            if isinstance(address, tuple):
                return address[0], address[1]
        return None

    def on_listening(self, callback: ListeningCallback) -> ListeningCallback:
        """Call ``callback(address)`` in the master once it listens and every worker is ready.

        ``address`` is the first TCP ``(host, port)`` bound, or a path when only
        Unix sockets are (see ``listen_on``).

        Returns ``callback``, so it can be used as a decorator.
        """
        self._listening_callbacks.append(callback)
        return callback

    def listen(self, port: int, host: str | None = None) -> None:
        """Master only: listen on ``port`` and serve until SIGTERM or SIGINT.

        ``port`` 0 picks a free port (see ``address``). ``host`` None (or "") listens on
        every interface, IPv4 and IPv6. Raises ``BindError`` if the address
        cannot be used and ``WorkerBootError`` if a worker dies while starting;
        in every case no worker process is left behind.
        """
        self._check_can_listen()
        validate_port(port)
        self._serve([Bind(host or None, port)])

    def listen_on(self, binds: Iterable[str]) -> None:
        """Master only: ``listen()`` on several addresses at once, e.g. ``["0.0.0.0:3000", "unix:/run/app.sock"]``.

        Each is ``HOST:PORT``, ``[IPV6]:PORT``, ``:PORT`` or ``PORT`` (every
        interface), or ``unix:/PATH`` (the socket file is removed at exit; clients
        of a Unix socket have no address, so IP hash spreads them in turn).
        """
        self._check_can_listen()
        if isinstance(binds, str):
            binds = [binds]
        parsed = [parse_bind(text) for text in binds]
        if not parsed:
            raise ValueError("listen_on() needs at least one address to listen on")
        self._serve(parsed)

    def _check_can_listen(self) -> None:
        if self._identity is not None:
            raise WrongProcessError(
                f"listen() was called in worker {self._identity.slot}; only the master listens. Use {_USAGE}"
            )
        if self._listen_called:
            raise RuntimeError("listen() was already called on this StickyServer; create one per program")

    def _serve(self, binds: list[Bind]) -> None:
        if (self.settings.user_id is not None or self.settings.group_id is not None) and os.geteuid() != 0:
            raise PermissionError(
                f"user/group ({self.settings.user}/{self.settings.group}) need the master to run as root; "
                "run it as root or drop them"
            )
        self._listen_called = True
        serving = Serving(self.settings, binds, self._workers)
        try:
            serving.open()
            self.addresses = serving.addresses
            self._dispatcher = serving.dispatcher(self._hooks, self._notify_listening)
            self._dispatcher.run()
        finally:
            self._dispatcher = None
            serving.close()
        logger.info("stopped")

    def stats(self) -> dict[str, Any]:
        """Master only, while serving: live figures per worker slot and for the master (see README, Stats).

        Safe to call from any thread: from outside the master's loop it waits for
        the loop to answer (at most a second).
        """
        return self._running().stats_from_any_thread()

    def on_stats(self, handler: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
        """Master: ``handler(stats)`` runs on SIGUSR1 (after the stats are logged); usable as a decorator."""
        self._hooks.stats.append(handler)
        return handler

    def _notify_listening(self) -> None:
        # The first TCP address, or with Unix sockets only, the first one's path.
        address = self.address or self.addresses[0]
        for callback in self._listening_callbacks:
            callback(address)

    def work(self, worker: object) -> None:
        """Worker only: give every connection routed here to ``worker.add_connection(sock)``.

        Blocks until the master stops this worker (then calls ``worker.stop()`` if
        it has one) or goes away. Raises TypeError at once if ``worker`` has no
        callable ``add_connection``. An asynchronous worker (an ``AsyncWorker``,
        or one whose ``start``, ``add_connection`` or ``stop`` is ``async def``)
        runs on a new event loop (``loop``): ``asyncio.run(sticky.serve(worker))``.
        """
        handler = self._worker_check(worker)
        if is_async_worker(handler):
            assert self._identity is not None
            settings, identity = self.settings, self._identity
            run_on_chosen_loop(
                self.serve(handler), settings.loop, settings.tells_the_client, identity.mapped_peers, identity.slot
            )
            return
        self._runtime(WorkerRuntime, handler).run()

    async def serve(self, worker: object) -> None:
        """Worker only: ``work()`` on the running event loop; returns when this worker has stopped.

        Connections arrive on this loop's thread (``add_connection`` may be
        ``async def``; it then runs as one task per connection), and so do
        messages. ``await worker.start()`` runs first if the worker has one.
        """
        await self._runtime(AsyncWorkerRuntime, self._worker_check(worker)).serve()

    def _runtime(self, kind: type[Runtime], handler: ConnectionHandler) -> Runtime:
        assert self._channel is not None and self._identity is not None
        runtime = start_runtime(kind, handler, self._identity, self._channel, self.settings, self._disarm_boot_hook)
        self._session = runtime.session
        return runtime

    def _worker_check(self, worker: object) -> ConnectionHandler:
        if self._identity is None:
            raise WrongProcessError(f"work() was called in the master process; only workers work. Use {_USAGE}")
        return check_worker(worker)

    # --- the channel --------------------------------------------------------------

    def on_message(self, handler: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        """Call ``handler(sender, message)`` for every message this process receives.

        In the master, ``sender`` is the worker's slot. In a worker, it is None for a
        message from the master, or the slot of the worker that published it.
        Handlers run on the master's loop, or in a worker on the thread that called
        ``work()`` (an asynchronous worker's event loop, where ``async def``
        handlers are run as tasks): keep them short. Returns ``handler``, so it can
        be used as a decorator.
        """
        if self._channel is not None:
            self._channel.handlers.append(handler)
        else:
            self._hooks.message.append(handler)
        return handler

    def on_worker_start(self, handler: Callable[[int], Any]) -> Callable[[int], Any]:
        """Master: call ``handler(worker_id)`` whenever a worker becomes ready (never called in workers)."""
        self._hooks.worker_start.append(handler)
        return handler

    def on_worker_exit(self, handler: Callable[[int, int], Any]) -> Callable[[int, int], Any]:
        """Master: call ``handler(worker_id, returncode)`` when a worker exits (negative: killed by that signal)."""
        self._hooks.worker_exit.append(handler)
        return handler

    def send(self, message: Any, to: int | None = None) -> None:
        """Send a JSON ``message``: from a worker to the master; from the master ``to`` one worker.

        Raises TypeError if it is not JSON, ValueError if it is over
        ``max_message_size``. Never blocks: if the receiver falls behind by more
        than 16 MiB, its oldest queued messages are dropped (logged). In the master,
        a message for a slot that has no worker right now is dropped (logged).
        """
        if self._channel is not None:
            if to is not None:
                raise TypeError("in a worker, send() goes to the master; use publish() to reach the other workers")
            self._channel.send(channel.encode(message, self.settings.max_message_size))
            return
        if isinstance(to, bool) or not isinstance(to, int) or not 0 <= to < self.workers:
            raise ValueError(f"send(message, to=...) needs a worker id from 0 to {self.workers - 1}; got {to!r}")
        body = channel.encode(message, self.settings.max_message_size)

        def deliver() -> None:
            if not self._running().messages.send(to, body):
                logger.warning("message for worker %d dropped: that slot has no worker right now", to)

        self._running().call_soon_threadsafe(deliver)

    def broadcast(self, message: Any) -> None:
        """Master only: send a JSON ``message`` to every worker (see ``send`` for errors and limits)."""
        if self._channel is not None:
            raise WrongProcessError("broadcast() is for the master; a worker reaches all workers with publish()")
        body = channel.encode(message, self.settings.max_message_size)
        self._running().call_soon_threadsafe(lambda: self._running().messages.broadcast(body))

    def publish(self, message: Any, include_self: bool = False) -> None:
        """Worker only: send a JSON ``message`` to every other worker (and this one, with ``include_self``).

        The master relays it; each receiver's handlers get ``(this worker's id, message)``.
        """
        if self._channel is None:
            raise WrongProcessError("publish() is for workers; the master reaches all workers with broadcast()")
        body = channel.encode(message, self.settings.max_message_size)
        self._channel.publish(body, include_self)

    def message_queue(self, loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Queue[tuple[Any, Any]]:
        """An asyncio queue of ``(sender, message)`` for every message from now on: ``await queue.get()``.

        For asyncio code on ``loop`` (default: the running loop); the messages are
        put on it thread-safely.
        """
        target = loop or asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[Any, Any]] = asyncio.Queue()
        self.on_message(lambda sender, message: target.call_soon_threadsafe(queue.put_nowait, (sender, message)))
        return queue

    def _running(self) -> Dispatcher:
        if self._dispatcher is None:
            raise RuntimeError("the master is not serving: send messages once listen() runs (e.g. from on_listening)")
        return self._dispatcher


def _become_current(sticky: StickyServer) -> None:
    """Make ``sticky`` this process's ``current_server()``: the first one made; in a worker, the only one."""
    identity = sticky._identity
    if identity is not None:
        if StickyServer._current is not None:
            raise WrongProcessError(
                f"worker {identity.slot} already has its StickyServer (the sticky-server command, or your "
                "code, made one); a second one would not be connected to the master, and what it sends "
                "would go nowhere. Use sticky_server.current_server() to reach the first one (StickyManager() "
                "with no argument does), or pass it to your worker factory"
            )
        StickyServer._current = sticky
    elif StickyServer._current is None:
        StickyServer._current = sticky


def current_server() -> StickyServer:
    """The ``StickyServer`` of this process: in a worker, the one connected to the master.

    For code that cannot be handed it, such as an app module run by the
    ``sticky-server`` command. Raises RuntimeError when none has been made.
    """
    if StickyServer._current is None:
        raise RuntimeError(
            "no StickyServer has been made in this process: run under the sticky-server command, "
            "or create one (StickyServer(...)) before asking for it"
        )
    return StickyServer._current


def time_left_to_stop() -> float:
    """Seconds this worker has left to finish once told to stop, before the master kills it.

    Adapters wait this long (less a margin) for requests in flight when they have
    no ``shutdown_timeout`` of their own. Before a stop began it is the whole
    graceful timeout (``DEFAULT_STOP_SECONDS`` outside a worker).
    """
    sticky = StickyServer._current
    session = None if sticky is None else sticky._session
    return DEFAULT_STOP_SECONDS if session is None else session.time_left_to_stop()


def trusted_forwarders(header: str) -> list[str] | None:
    """The trusted proxies, as strings, when this process's StickyServer routes by ``header``; else None.

    For an adapter whose framework reads that header itself, request by request.
    """
    sticky = StickyServer._current
    settings = None if sticky is None else sticky.settings.client_addresses
    if settings is None or settings.forwarded_header != header:
        return None
    return settings.trusted.names
