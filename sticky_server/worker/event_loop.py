"""The event loop an asynchronous worker runs on: uvloop where it is installed, as uvicorn picks.

``work(worker)`` runs an asynchronous worker on a new loop. With ``loop="auto"``
(the default) that loop is uvloop's when uvloop imports, unless the program has
set an event loop policy of its own, or unless the app would see other clients on
it. uvloop's transports take the peer from the descriptor, not from the socket
object the worker was handed, so:

- behind a proxy setting (``tells_the_client``), the app would see the proxy's
  address instead of the client the proxy named;
- on a listener that takes IPv4 clients on IPv6 (``mapped_peers``, a dual-stack
  bind such as ``listen(port)`` on every interface), it would see
  ``::ffff:a.b.c.d`` where the worker's sockets say ``a.b.c.d``.

``"asyncio"`` is the standard loop. ``"uvloop"`` insists: refused behind a proxy
setting, honoured on a dual-stack listener (the app then sees ``::ffff:`` addresses,
as it would under uvicorn alone).
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

__all__ = ["LOOPS", "check_loop", "chosen_uvloop", "run_on_chosen_loop", "why_not_uvloop"]

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


UVLOOP_MAPS_IPV4 = (
    "a listener takes IPv4 clients on IPv6, and under uvloop the app would see them as ::ffff:a.b.c.d; bind "
    "0.0.0.0 and [::] apart (or an IPv4 address) for uvloop, or ask for it (--loop uvloop, loop='uvloop') "
    "to take those addresses"
)


def why_not_uvloop(tells_the_client: bool, mapped_peers: bool) -> str | None:
    """Why ``loop="auto"`` stays on asyncio's loop here, or None."""
    if tells_the_client:
        return UVLOOP_LOSES_THE_CLIENT
    if mapped_peers:
        return UVLOOP_MAPS_IPV4
    return None


def chosen_uvloop(choice: str, tells_the_client: bool, mapped_peers: bool = False) -> ModuleType | None:
    """The uvloop module when ``choice`` (checked) picks it here, else None (asyncio's loop)."""
    if choice == "asyncio" or tells_the_client:
        return None
    if choice == "auto" and (mapped_peers or _policy_of_its_own()):
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def run_on_chosen_loop(
    main: Coroutine[Any, Any, None],
    choice: str,
    tells_the_client: bool,
    mapped_peers: bool = False,
    slot: int | None = None,
) -> None:
    """``asyncio.run(main)`` on the loop ``choice`` picks (module docstring); worker ``slot`` 0 says
    why "auto" passed over an installed uvloop."""
    why = why_not_uvloop(tells_the_client, mapped_peers)
    if choice == "auto" and why is not None and slot == 0 and importlib.util.find_spec("uvloop") is not None:
        logger.info("the workers run on asyncio's loop, not uvloop: %s", why)
    uvloop = chosen_uvloop(choice, tells_the_client, mapped_peers)
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
