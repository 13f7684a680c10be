"""Fixtures shared by the in-process tests (the integration tests have their own conftest)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sticky_server import StickyServer

from .worker_harness import Master


@pytest.fixture(autouse=True)
def no_current_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with no StickyServer made in this process: pubsub's hub follows the first one made."""
    monkeypatch.setattr(StickyServer, "_current", None)


@pytest.fixture
def master() -> Iterator[Master]:
    """The master's end of a worker's control socketpair, driven by hand."""
    control = Master()
    yield control
    control.close()
