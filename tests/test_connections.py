"""The worker's record of open connections: closes are seen whatever closed them."""

from __future__ import annotations

import os
import socket

from sticky_server.connections import ConnectionRecord


def test_the_sweep_counts_closed_and_reused_descriptors() -> None:
    record = ConnectionRecord()
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        for ours, _ in pairs:
            record.add(ours.fileno(), None)
        assert record.sweep() == 0 and len(record) == 4
        pairs[0][0].close()
        # Closed, then the number reused by a new socket (the lowest free number): still a close.
        number = pairs[1][0].fileno()
        pairs[1][0].close()
        unrelated = socket.socket()
        replacement = socket.socket(fileno=os.dup2(unrelated.fileno(), number))
        unrelated.close()
        assert record.sweep() == 2 and len(record) == 2
        # A descriptor handed over again before any sweep counts its previous connection as closed.
        record.add(pairs[2][0].fileno(), None)
        assert record.sweep() == 1
        replacement.close()
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


def test_addresses_are_given_only_for_the_connection_they_came_with() -> None:
    record = ConnectionRecord()
    first, other = socket.socketpair()
    record.add(first.fileno(), ("203.0.113.4", 5000))
    assert record.address(first) == ("203.0.113.4", 5000)
    number = first.fileno()
    first.close()
    second = socket.socket()
    try:
        if second.fileno() == number:
            assert record.address(second) is None  # same number, another socket
    finally:
        second.close()
        other.close()
