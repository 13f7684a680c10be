"""StickyChannelLayer outside a server (one process, as in ``manage.py test``): channels' layer semantics and errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("channels")

from channels.exceptions import ChannelFull

from sticky_server.adapters.channels import StickyChannelLayer


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 10))


def test_groups_reach_their_members_with_bytes_and_nesting_intact() -> None:
    async def main() -> None:
        layer = StickyChannelLayer()
        one, two, out = [await layer.new_channel() for _ in range(3)]
        for channel in (one, two, out):
            await layer.group_add("room", channel)
        await layer.group_discard("room", out)
        message = {"type": "chat.message", "blob": b"\x00\xff", "nested": {"list": [1, (2, 3)]}}
        await layer.group_send("room", message)
        for channel in (one, two):
            got = await layer.receive(channel)
            assert got == {"type": "chat.message", "blob": b"\x00\xff", "nested": {"list": [1, [2, 3]]}}
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(layer.receive(out), 0.1)
        await layer.close()

    run(main())


def test_a_full_channel_raises_channel_full_and_a_group_send_skips_it() -> None:
    async def main() -> None:
        layer = StickyChannelLayer(capacity=2)
        channel = await layer.new_channel()
        await layer.send(channel, {"type": "a"})
        await layer.send(channel, {"type": "b"})
        with pytest.raises(ChannelFull):
            await layer.send(channel, {"type": "c"})
        await layer.group_add("g", channel)
        await layer.group_send("g", {"type": "d"})  # no error: the full channel misses it
        assert layer.dropped == 1
        assert [(await layer.receive(channel))["type"] for _ in range(2)] == ["a", "b"]

    run(main())


def test_bad_input_is_refused_with_the_reason() -> None:
    async def main() -> None:
        layer = StickyChannelLayer()
        channel = await layer.new_channel()
        with pytest.raises(TypeError):
            await layer.group_add("bad group!", channel)  # a name channels refuses
        with pytest.raises(TypeError):
            await layer.send(channel, {"type": "x", "when": object()})  # not serialisable
        with pytest.raises(ValueError, match=r"max_message_size|bytes"):
            await layer.group_send("g", {"type": "x", "text": "a" * (2 * 1024 * 1024)})
        with pytest.raises(AssertionError):
            await layer.receive("specific.someone-else!abc")

    run(main())


def test_messages_expire_and_flush_empties_everything() -> None:
    async def main() -> None:
        layer = StickyChannelLayer(expiry=0.05)
        channel = await layer.new_channel()
        await layer.send(channel, {"type": "old"})
        await asyncio.sleep(0.1)
        await layer.send(channel, {"type": "new"})
        assert (await layer.receive(channel))["type"] == "new"
        await layer.group_add("g", channel)
        await layer.send(channel, {"type": "gone"})
        await layer.flush()
        await layer.group_send("g", {"type": "after flush"})
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(layer.receive(channel), 0.1)

    run(main())
