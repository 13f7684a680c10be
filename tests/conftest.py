"""Fixtures shared by the in-process tests (the integration tests have their own conftest)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .worker_harness import Master


@pytest.fixture
def master() -> Iterator[Master]:
    """The master's end of a worker's control socketpair, driven by hand."""
    control = Master()
    yield control
    control.close()
