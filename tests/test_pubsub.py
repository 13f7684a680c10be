"""The publish/subscribe API outside a server (one process): delivery, bounds, closing, errors."""

from __future__ import annotations

import asyncio
import threading

import pytest

from sticky_server import pubsub


def test_every_subscriber_of_a_topic_gets_a_copy_and_others_nothing() -> None:
    with pubsub.subscribe("room:1") as first, pubsub.subscribe("room:1") as second, pubsub.subscribe("room:2") as other:
        message = {"text": "hi", "n": [1, 2]}
        pubsub.publish("room:1", message)
        got = first.get_blocking(timeout=1)
        assert got == message and got is not message
        assert second.get_blocking(timeout=1) == message
        with pytest.raises(TimeoutError):
            other.get_blocking(timeout=0.01)


def test_async_iteration_ends_when_closed() -> None:
    async def main() -> list[object]:
        subscription = pubsub.subscribe("numbers")
        received = []

        async def read() -> None:
            async for message in subscription:
                received.append(message)

        reader = asyncio.create_task(read())
        await asyncio.sleep(0)
        for n in range(3):
            pubsub.publish("numbers", n)
        await asyncio.sleep(0)
        subscription.close()
        await asyncio.wait_for(reader, 2)
        return received

    assert asyncio.run(main()) == [0, 1, 2]


def test_a_reader_on_another_thread_s_loop_is_woken() -> None:
    subscription = pubsub.subscribe("from-a-thread")
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(asyncio.run(asyncio.wait_for(subscription.get(), 5))))
    reader.start()
    while not subscription._waiters:
        threading.Event().wait(0.001)
    pubsub.publish("from-a-thread", "hello")
    reader.join(5)
    assert got == ["hello"]
    subscription.close()


def test_a_subscriber_that_never_reads_keeps_the_newest_and_counts_the_rest() -> None:
    with pubsub.subscribe("flood", max_queued=10) as slow:
        for n in range(1000):
            pubsub.publish("flood", n)
        assert slow.dropped == 990
        assert [slow.get_blocking(timeout=1) for _ in range(10)] == list(range(990, 1000))


def test_bad_topics_and_messages_are_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="a topic is a non-empty str"):
        pubsub.publish("", 1)
    with pytest.raises(TypeError):
        pubsub.publish("t", {1, 2})
    with pytest.raises(ValueError, match="max_queued"):
        pubsub.subscribe("t", max_queued=0)


def test_a_closed_subscription_gets_nothing_more() -> None:
    subscription = pubsub.subscribe("closing")
    pubsub.publish("closing", 1)
    subscription.close()
    pubsub.publish("closing", 2)
    assert list(subscription) == [1]
