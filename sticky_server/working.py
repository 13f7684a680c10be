"""A worker process's side of ``StickyServer``: its session and the loop that drives it, from the server's settings.

``StickyServer.work`` and ``serve`` check the user's worker object and run it with
``selector_loop.WorkerRuntime`` or ``asyncio_loop.AsyncWorkerRuntime``; what the
session is told comes from the one ``ServerSettings`` (the stop budget, whether
hand-offs carry a proxy-told client, whether accepts are reported at once for
recycling, the proxy hint when no proxy setting is given).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from .sessions import RouteBy
from .settings import ServerSettings
from .worker.asyncio_loop import AsyncWorkerRuntime
from .worker.base import ConnectionHandler
from .worker.channel import WorkerChannel
from .worker.engineio_sessions import arrange_engineio_sessions
from .worker.environment import WorkerIdentity
from .worker.local_layers import warn_about_process_local_layers
from .worker.proxy_hint import ProxyHint
from .worker.selector_loop import WorkerRuntime
from .worker.session import WorkerSession
from .worker.sorting import SessionSorter

__all__ = ["arrange_one_request_per_connection", "peer_from_proxy", "start_runtime"]

logger = logging.getLogger("sticky_server.worker")

Runtime = TypeVar("Runtime", WorkerRuntime, AsyncWorkerRuntime)


def start_runtime(
    kind: type[Runtime],
    handler: ConnectionHandler,
    identity: WorkerIdentity,
    channel: WorkerChannel,
    settings: ServerSettings,
    on_ready: Callable[[], None] | None,
) -> Runtime:
    """The loop of ``kind`` driving a new session of ``handler`` in this worker process."""
    route = settings.route_by if isinstance(settings.route_by, RouteBy) else None
    if route is not None and route.kind == "engineio":
        arrange_engineio_sessions(identity.slot)
    elif route is not None:
        arrange_one_request_per_connection(handler, route, identity.slot)
    warn_about_process_local_layers(settings.workers or 1, identity.slot)
    sorter = None
    if route is not None and identity.listeners:  # the kernel path: this worker accepts, then sorts
        sorter = SessionSorter(route, identity.slot, settings.max_header_size)
    session = WorkerSession(
        handler,
        channel,
        identity.slot,
        on_ready=on_ready,
        graceful_timeout=settings.graceful_timeout,
        peer_from_proxy=peer_from_proxy(settings, handler),
        listeners=identity.listeners,
        report_accepts_at_once=settings.max_connections_per_worker is not None,
        proxy_hint=ProxyHint(identity.slot) if settings.client_addresses is None else None,
        sorter=sorter,
    )
    return kind(session)


def peer_from_proxy(settings: ServerSettings, handler: object) -> bool:
    """Whether handed-off sockets report the proxy-told client as their peer (see ``worker.connections``).

    Yes behind a PROXY-protocol proxy; behind a forwarded header too, unless the
    worker's framework reads that header itself, request by request
    (``forwarded_headers_read``), and so needs to see the proxy as the peer.
    """
    addresses = settings.client_addresses
    if addresses is None:
        return False
    if addresses.proxy_protocol:
        return True
    header = addresses.forwarded_header
    return header is not None and header not in getattr(handler, "forwarded_headers_read", ())


def arrange_one_request_per_connection(handler: ConnectionHandler, route: RouteBy, slot: int) -> bool:
    """Have ``handler`` end each HTTP response's connection (``route_by`` a named key); warn when it cannot.

    Each request then comes on a new connection, whose first request is the one the
    master or the kernel-path worker reads to route it: a client or a proxy that
    would send requests for several keys on one kept-alive connection (browsers pool
    connections, proxies mix clients on theirs) sends each to its own key's worker.
    """
    close_each_response = getattr(handler, "close_each_response", None)
    if callable(close_each_response) and close_each_response():
        return True
    if slot == 0:  # once, not once per worker
        logger.warning(
            "route_by=%s: %s cannot end each HTTP response's connection, so a request for another key on a "
            "kept-alive connection is served by the worker of the connection's first request. Answer each "
            "request with 'Connection: close', or serve the app with one of sticky_server.adapters",
            route,
            type(handler).__name__,
        )
    return False
