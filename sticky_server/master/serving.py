"""The master's run: its listeners (the kernel path's listener groups, or one listener per bind), then its loop.

``StickyServer.listen`` makes one ``Serving`` from the server's settings: ``open``
binds (on the kernel path through ``steering``, else each bind's listener, with a
warning about Unix-socket clients IP hash cannot tell apart), ``dispatcher`` builds
the supervisor and the loop from the same settings, and ``close`` leaves nothing
behind (the listeners, a Unix socket's file, the steering groups).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from ..balancer import IPHashBalancer
from ..errors import BindError
from ..listener import Bind, defer_accept, open_bind, takes_mapped_ipv4
from ..protocol.environment import MAPPED_PEERS_ENV
from ..sessions import SessionBalancer
from ..settings import ServerSettings
from ..steering import KernelSteering, kernel_path_unavailable, open_kernel_steering
from .hooks import Hooks
from .loop import Dispatcher
from .supervisor import Supervisor

__all__ = ["Serving"]

logger = logging.getLogger("sticky_server")


class Serving:
    """One run of the master: its listeners and its loop (module docstring)."""

    def __init__(self, settings: ServerSettings, binds: list[Bind], workers: int) -> None:
        self._settings = settings
        self._binds = binds
        self._workers = workers
        self._listeners: list[socket.socket] = []
        self._steering: KernelSteering | None = None
        self.addresses: list[Any] = []  # what each bind is bound to (a path for a Unix socket)

    def open(self) -> None:
        """Bind every address: raises BindError (in CLI-neutral terms) if one cannot be used."""
        steering = self._steering = self._kernel_steering()
        if steering is not None:
            self.addresses = [group.address for group in steering.groups]
            self._tell_workers_of_mapped_peers([group.listeners[0] for group in steering.groups])
            return
        settings = self._settings
        for bind in self._binds:
            listener = open_bind(bind, settings.backlog, settings.unix_socket_mode)
            if settings.route_by is not None:
                defer_accept(listener)
            self._listeners.append(listener)
        self._warn_about_unix_clients()
        self.addresses = [listener.getsockname() for listener in self._listeners]
        self._tell_workers_of_mapped_peers(self._listeners)

    def _tell_workers_of_mapped_peers(self, listeners: list[socket.socket]) -> None:
        # Through the environment every worker inherits (worker.event_loop: uvloop would show them).
        if any(takes_mapped_ipv4(listener) for listener in listeners):
            os.environ[MAPPED_PEERS_ENV] = "1"
        else:
            os.environ.pop(MAPPED_PEERS_ENV, None)

    def dispatcher(self, hooks: Hooks, on_ready: Callable[[], None]) -> Dispatcher:
        """The supervisor and the loop for these listeners."""
        settings, steering = self._settings, self._steering
        supervisor = Supervisor(
            self._workers,
            user=settings.user_id,
            group=settings.group_id,
            graceful_timeout=settings.graceful_timeout,
            timeout=settings.timeout,
            listeners_for=steering.listeners if steering is not None else None,
            routes_to_starting=steering is None,
        )
        assert not isinstance(settings.balancer, str)
        return Dispatcher(
            self._listeners,
            supervisor,
            settings.balancer,
            max_connections_per_worker=settings.max_connections_per_worker,
            max_connections_jitter=settings.max_connections_jitter,
            on_ready=on_ready,
            hooks=hooks,
            client_addresses=settings.client_addresses,
            max_message_size=settings.max_message_size,
            steering=steering,
        )

    def close(self) -> None:
        """Close every listener, remove each Unix socket's file."""
        os.environ.pop(MAPPED_PEERS_ENV, None)
        if self._steering is not None:
            self._steering.close()
        for listener, bind in zip(self._listeners, self._binds, strict=False):
            listener.close()
            if bind.path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(bind.path)

    def _warn_about_unix_clients(self) -> None:
        settings = self._settings
        if settings.client_addresses is not None or not isinstance(settings.balancer, IPHashBalancer):
            return
        for bind in self._binds:
            if bind.path is not None:
                logger.warning(
                    "clients of unix:%s have no address, so IP hash sends each connection to the next worker in "
                    "turn: sessions (socket.io's polling, any state kept in a worker) break. Behind a proxy, route "
                    "by its header: forwarded_header='x-forwarded-for' (the command line does it by default for "
                    "Unix sockets), or proxy_protocol=True",
                    bind.path,
                )

    def _kernel_steering(self) -> KernelSteering | None:
        """The kernel path's listener groups, or None for the master path (see ``steering``)."""
        settings = self._settings
        balancer, wanted = settings.balancer, settings.steering
        assert not isinstance(balancer, str)
        addresses = settings.client_addresses
        why = kernel_path_unavailable(wanted, balancer, self._binds, addresses is not None and addresses.names_clients)
        if why is None:
            # Routed by session, the kernel still makes IP hash's choice: each worker then sorts what it accepts.
            ip_hash = balancer.ip_hash if isinstance(balancer, SessionBalancer) else balancer
            assert isinstance(ip_hash, IPHashBalancer)
            try:
                return open_kernel_steering(
                    self._binds, self._workers, ip_hash, settings.backlog, defer_accept=settings.route_by is not None
                )
            except BindError:
                raise
            except (OSError, ValueError) as exc:
                why = f"the kernel refused the steering program ({exc})"
        if wanted == "kernel":
            raise ValueError(f"steering='kernel' is not possible here: {why}. Use steering='auto' or 'master'")
        if wanted == "auto":
            # A choice of the user's (a balancer, a proxy header) is news; the kernel saying no is a surprise.
            level = logging.WARNING if why.startswith("the kernel refused") else logging.INFO
            logger.log(level, "connections go through the master: %s", why)
        return None
