"""Sticky load balancing of connections across worker processes on one machine.

A master accepts every connection, picks a worker for it (by client IP by
default, consistently), and passes the connected socket to that worker over a
Unix socket. See ``StickyServer``.
"""

from .balancer import Balancer, ClientInfo, IPHashBalancer, RoundRobinBalancer, WorkerSet
from .errors import BindError, ProtocolError, StickyServerError, WorkerBootError, WrongProcessError
from .server import StickyServer
from .worker import Worker

__all__ = [
    "Balancer",
    "BindError",
    "ClientInfo",
    "IPHashBalancer",
    "ProtocolError",
    "RoundRobinBalancer",
    "StickyServer",
    "StickyServerError",
    "Worker",
    "WorkerBootError",
    "WorkerSet",
    "WrongProcessError",
]

__version__ = "0.1.0"
