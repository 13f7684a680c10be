"""With ``route_by="engineio"``: this worker's engine.io session ids name its slot; its polling responses close.

The master routes a request of a known session by the slot its ``sid`` starts with
(``sessions.slot_in_sid``), so the ids this worker hands out must carry its slot, and
the master reads only the first request of a connection, so a polling connection must
carry one session only: each polling response ends its connection (``Connection:
close``; the next request comes on a new one and is routed by its own sid). Both are
arranged here for every engine.io server of the process (python-engineio's
``BaseServer``, so python-socketio, Flask-SocketIO and any framework's), with no code
of the user's. Without python-engineio installed there is nothing to arrange.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..sessions import sid_with_slot

__all__ = ["arrange_engineio_sessions"]

logger = logging.getLogger("sticky_server.worker")


def arrange_engineio_sessions(slot: int) -> bool:
    """Make this process's engine.io servers hand out ids naming ``slot`` and close polling connections.

    False when python-engineio is not installed (nothing to arrange). Idempotent.
    """
    try:
        from engineio import base_server
    except ImportError:
        return False
    server_class: Any = base_server.BaseServer
    arranged = getattr(server_class, "_sticky_server_slot", None)
    if arranged == slot:
        return True
    generate_id: Callable[[Any], str] = getattr(server_class, "_sticky_server_generate_id", server_class.generate_id)
    ok: Callable[..., dict[str, Any]] = getattr(server_class, "_sticky_server_ok", server_class._ok)

    def slot_generate_id(self: Any) -> str:
        return sid_with_slot(slot, generate_id(self))

    def closing_ok(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        response = ok(self, *args, **kwargs)
        response["headers"] = [*response["headers"], ("Connection", "close")]
        return response

    server_class._sticky_server_generate_id = generate_id
    server_class._sticky_server_ok = ok
    server_class.generate_id = slot_generate_id
    server_class._ok = closing_ok
    server_class._sticky_server_slot = slot
    logger.debug("worker %d: engine.io session ids name this slot; polling responses close", slot)
    return True
