"""The Django Channels tutorial's chat (a websocket consumer in a group per room), one file, run by the command.

    sticky-server apps.django_chat:application --asgi -w 4

CHANNEL_LAYERS names ``sticky_server.adapters.channels.StickyChannelLayer`` (APP_LAYER
overrides the backend: channels' own ``InMemoryChannelLayer`` for the control run, or
channels-redis's ``RedisChannelLayer`` on the Redis at APP_LAYER_HOSTS for two
machines). Each message back also names the worker and the machine (APP_NAME) that sent it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="not-secret-test-only",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*"],
    MIDDLEWARE=[],
    INSTALLED_APPS=["channels"],
    CHANNEL_LAYERS={
        "default": {
            "BACKEND": os.environ.get("APP_LAYER", "sticky_server.adapters.channels.StickyChannelLayer"),
            "CONFIG": {"hosts": [os.environ["APP_LAYER_HOSTS"]]} if os.environ.get("APP_LAYER_HOSTS") else {},
        }
    },
)
django.setup()

from channels.generic.websocket import AsyncWebsocketConsumer  # noqa: E402 (after settings, as Django requires)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402
from django.urls import re_path  # noqa: E402

from sticky_server import current_server  # noqa: E402

urlpatterns: list[Any] = []


class ChatConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]
    async def connect(self) -> None:
        self.room_name = self.scope["url_route"]["kwargs"]["room_name"]
        self.room_group_name = f"chat_{self.room_name}"
        await self.channel_layer.group_add(self.room_group_name, self.channel_name)
        await self.accept()

    async def disconnect(self, close_code: int) -> None:
        await self.channel_layer.group_discard(self.room_group_name, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        message = json.loads(text_data or "{}")["message"]
        await self.channel_layer.group_send(self.room_group_name, {"type": "chat.message", "message": message})

    async def chat_message(self, event: dict[str, Any]) -> None:
        worker = current_server().worker_id
        machine = os.environ.get("APP_NAME", "")
        await self.send(text_data=json.dumps({"message": event["message"], "worker": worker, "machine": machine}))


application = ProtocolTypeRouter(
    {
        "http": get_asgi_application(),
        "websocket": URLRouter([re_path(r"ws/chat/(?P<room_name>\w+)/$", ChatConsumer.as_asgi())]),
    }
)
