"""Exceptions raised by sticky_server, grouped by meaning under one base class."""

from __future__ import annotations

__all__ = [
    "BindError",
    "PidFileError",
    "ProtocolError",
    "StickyServerError",
    "WorkerBootError",
    "WrongProcessError",
]


class StickyServerError(Exception):
    """Base class of every error sticky_server raises on purpose."""


# --- start-up ---------------------------------------------------------------


class BindError(StickyServerError, OSError):
    """The master could not listen on the requested address."""


class WorkerBootError(StickyServerError):
    """A worker exited before it was ready while the server was starting."""


class PidFileError(StickyServerError, ValueError):
    """A pid or stats file cannot be trusted: a link, another user's file, or a running master's."""


class WrongProcessError(StickyServerError, RuntimeError):
    """A master-only call was made in a worker, or a worker-only call in the master."""


# --- between master and workers ----------------------------------------------


class ProtocolError(StickyServerError):
    """A control-socket peer sent bytes that are not a valid frame."""
