"""What each adapter needs beyond the standard library, and the one-line error when it is missing.

An adapter's import of its framework goes through ``missing_extra`` so that a missing extra reads
as the install command to run, never as the user's app failing to import.
"""

from __future__ import annotations

__all__ = ["EXTRAS", "FRAMEWORKS", "MissingExtraError", "missing_extra"]

# adapter -> (the extra that brings what it needs, what that is for)
EXTRAS = {
    "asgi": ("asgi", "ASGI apps (FastAPI, Starlette, Django ASGI, python-socketio's ASGIApp) run on uvicorn"),
    "aiohttp": ("aiohttp", "aiohttp apps run on aiohttp"),
    "tornado": ("tornado", "tornado apps run on tornado"),
    "wsgi": ("wsgi", "WSGI apps get keep-alive and websockets from gunicorn's parser and simple-websocket"),
    "socketio": ("socketio", "the socket.io client managers extend python-socketio"),
    "channels": ("channels", "the Channels layer implements Django Channels' layer API"),
    "broadcaster": ("broadcaster", "the broadcast backend implements the broadcaster package's backend API"),
}


# adapter -> the top-level modules it imports from its extra
FRAMEWORKS = {
    "asgi": ("uvicorn",),
    "aiohttp": ("aiohttp",),
    "tornado": ("tornado",),
    "wsgi": ("gunicorn",),
    "socketio": ("socketio", "engineio"),
    "channels": ("channels", "django", "asgiref"),
    "broadcaster": ("broadcaster",),
}


class MissingExtraError(ImportError):
    """A framework an adapter needs is not installed; the message is the command that installs it."""

    def __init__(self, adapter: str, module: str) -> None:
        extra, why = EXTRAS[adapter]
        super().__init__(
            f"{why}, and {module} is not installed: pip install 'sticky-server[{extra}]'",
            name=module,
        )
        self.adapter = adapter
        self.extra = extra


def missing_extra(exc: ModuleNotFoundError, adapter: str) -> ImportError:
    """What to raise for ``exc`` in ``adapter``'s import: MissingExtraError when the framework itself is missing.

    try:
        import uvicorn
    except ModuleNotFoundError as exc:
        raise missing_extra(exc, "asgi") from exc
    """
    top = (exc.name or "").partition(".")[0]
    if top in FRAMEWORKS[adapter]:
        return MissingExtraError(adapter, top)
    return exc  # the framework is there but something it imports is not: its own error says more
