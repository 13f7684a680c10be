"""The event loop an asynchronous worker runs on: uvloop where it is installed, as uvicorn picks.

``work(worker)`` runs an asynchronous worker on a new loop. With ``loop="auto"``
(the default) that loop is uvloop's when uvloop imports, unless the program
has set an event loop policy of its own, or unless handed-off sockets may name
a client a proxy told (``tells_the_client``): uvloop's transports take the peer
from the descriptor, not from the socket object the worker was handed, so the
app would see the proxy's address instead. ``"asyncio"`` is the standard loop
and ``"uvloop"`` insists (refused where it would lose the client).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import sys
import warnings
from collections.abc import Coroutine
from types import ModuleType
from typing import Any

__all__ = ["LOOPS", "check_loop", "run_on_chosen_loop"]

logger = logging.getLogger("sticky_server.worker")

LOOPS = ("auto", "asyncio", "uvloop")

UVLOOP_LOSES_THE_CLIENT = (
    "behind proxy_protocol or a forwarded header the app must see the client the proxy named, and uvloop's "
    "transports take the peer from the descriptor, not from the socket the master handed over"
)


def check_loop(choice: str, tells_the_client: bool) -> None:
    """Refuse a ``loop`` setting that cannot be honoured (ValueError naming the fix)."""
    if choice not in LOOPS:
        raise ValueError(f"loop must be one of {', '.join(map(repr, LOOPS))}; got {choice!r}")
    if choice != "uvloop":
        return
    if tells_the_client:
        raise ValueError(f"loop uvloop: {UVLOOP_LOSES_THE_CLIENT}; use 'asyncio' (or 'auto')")
    if importlib.util.find_spec("uvloop") is None:
        raise ValueError("loop uvloop needs uvloop: pip install uvloop")


def chosen_uvloop(choice: str, tells_the_client: bool) -> ModuleType | None:
    """The uvloop module when ``choice`` (checked) picks it here, else None (asyncio's loop)."""
    if choice == "asyncio" or tells_the_client:
        if tells_the_client and choice == "auto":
            logger.debug("the asyncio loop, not uvloop: %s", UVLOOP_LOSES_THE_CLIENT)
        return None
    if choice == "auto" and _policy_of_its_own():
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def run_on_chosen_loop(main: Coroutine[Any, Any, None], choice: str, tells_the_client: bool) -> None:
    """``asyncio.run(main)`` on the loop ``choice`` picks (module docstring)."""
    uvloop = chosen_uvloop(choice, tells_the_client)
    if uvloop is None:
        asyncio.run(main)
    elif sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main)
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.run(main)


def _policy_of_its_own() -> bool:
    # Policies are deprecated from Python 3.14; a program that still sets one has chosen its loop.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return type(asyncio.get_event_loop_policy()) is not asyncio.DefaultEventLoopPolicy
