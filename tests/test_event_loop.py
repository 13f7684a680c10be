"""The event loop of an asynchronous worker: uvloop where installed (``loop="auto"``), never where it loses clients."""

from __future__ import annotations

import asyncio
import socket
import sys

import pytest
from pytest_mock import MockerFixture

from sticky_server import StickyServer
from sticky_server.listener import takes_mapped_ipv4
from sticky_server.worker.event_loop import check_loop, chosen_uvloop, run_on_chosen_loop

uvloop = pytest.importorskip("uvloop")


def test_auto_takes_uvloop_only_when_installed(mocker: MockerFixture) -> None:
    assert chosen_uvloop("auto", tells_the_client=False) is uvloop
    assert chosen_uvloop("uvloop", tells_the_client=False) is uvloop
    assert chosen_uvloop("asyncio", tells_the_client=False) is None
    mocker.patch.dict(sys.modules, {"uvloop": None})  # not installed
    assert chosen_uvloop("auto", tells_the_client=False) is None


def test_auto_stays_on_asyncio_where_uvloop_would_lose_the_client_a_proxy_named() -> None:
    # uvloop's transports take the peer from the descriptor: the app would see the proxy.
    assert chosen_uvloop("auto", tells_the_client=True) is None
    with pytest.raises(ValueError, match="uvloop's transports take the peer from the descriptor"):
        check_loop("uvloop", tells_the_client=True)
    with pytest.raises(ValueError, match="loop uvloop: behind proxy_protocol"):
        StickyServer(2, loop="uvloop", proxy_protocol=True)
    assert StickyServer(2, proxy_protocol=True).settings.loop == "auto"


def test_a_policy_the_program_set_is_its_choice(mocker: MockerFixture) -> None:
    mocker.patch.object(asyncio, "get_event_loop_policy", return_value=uvloop.EventLoopPolicy())
    assert chosen_uvloop("auto", tells_the_client=False) is None


def test_refusals_name_the_fix(mocker: MockerFixture) -> None:
    with pytest.raises(ValueError, match="loop must be one of 'auto', 'asyncio', 'uvloop'; got 'trio'"):
        StickyServer(2, loop="trio")
    mocker.patch("importlib.util.find_spec", return_value=None)
    with pytest.raises(ValueError, match="loop uvloop needs uvloop: pip install uvloop"):
        check_loop("uvloop", tells_the_client=False)


@pytest.mark.parametrize(("choice", "expected"), [("auto", "uvloop"), ("asyncio", "asyncio")])
def test_the_worker_s_coroutine_runs_on_the_chosen_loop(choice: str, expected: str) -> None:
    seen: list[str] = []

    async def main() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__.split(".")[0])

    run_on_chosen_loop(main(), choice, tells_the_client=False)
    assert seen == [expected]


def test_auto_stays_on_asyncio_on_a_listener_that_takes_ipv4_clients_on_ipv6() -> None:
    # uvloop reads the peer from the descriptor: ::ffff:a.b.c.d where the worker's sockets say a.b.c.d.
    assert chosen_uvloop("auto", tells_the_client=False, mapped_peers=True) is None
    assert chosen_uvloop("uvloop", tells_the_client=False, mapped_peers=True) is uvloop  # insisted on: honoured


@pytest.mark.parametrize(("family", "v6only", "expected"), [("4", None, False), ("6", 0, True), ("6", 1, False)])
def test_a_listener_takes_mapped_ipv4_clients_only_when_ipv6_and_not_v6only(
    family: str, v6only: int | None, expected: bool
) -> None:
    if family == "6" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    with socket.socket(socket.AF_INET6 if family == "6" else socket.AF_INET) as listener:
        if v6only is not None:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
        assert takes_mapped_ipv4(listener) is expected
