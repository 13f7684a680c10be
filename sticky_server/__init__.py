"""Sticky load balancing of connections across worker processes on one machine.

A master accepts every connection, picks a worker for it (by client IP by
default, consistently), and passes the connected socket to that worker over a
Unix socket. See ``StickyServer``.
"""

from .balancer import (
    Balancer,
    ClientInfo,
    IPHashBalancer,
    LeastConnectionsBalancer,
    RandomBalancer,
    RoundRobinBalancer,
    WorkerSet,
)
from .errors import BindError, PidFileError, ProtocolError, StickyServerError, WorkerBootError, WrongProcessError
from .server import StickyServer, current_server, time_left_to_stop
from .settings import ServerSettings
from .worker.base import AsyncWorker, Worker
from .worker.connections import client_address

__all__ = [
    "AsyncWorker",
    "Balancer",
    "BindError",
    "ClientInfo",
    "IPHashBalancer",
    "LeastConnectionsBalancer",
    "PidFileError",
    "ProtocolError",
    "RandomBalancer",
    "RoundRobinBalancer",
    "ServerSettings",
    "StickyServer",
    "StickyServerError",
    "Worker",
    "WorkerBootError",
    "WorkerSet",
    "WrongProcessError",
    "client_address",
    "current_server",
    "time_left_to_stop",
]

__version__ = "0.6.0"
