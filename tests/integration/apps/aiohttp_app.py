"""An aiohttp app as its documentation writes one, run by the sticky-server command.

sticky-server apps.aiohttp_app:app --aiohttp -w 4
"""

from __future__ import annotations

from aiohttp import web

from sticky_server import current_server


async def index(request: web.Request) -> web.Response:
    return web.json_response({"worker": current_server().worker_id, "client": request.remote, "scheme": request.scheme})


app = web.Application()
app.router.add_get("/", index)
