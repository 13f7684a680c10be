"""Kernel steering: the kernel puts each new connection on its slot's own listener; workers accept it.

Two paths lead to the same choice of worker (``rendezvous``):

- the **master path**: the master accepts every connection, the balancer picks a
  slot, the descriptor goes over the worker's control socket (``master``);
- the **kernel path** (Linux, TCP binds, the IP-hash balancer, no proxy header to
  read): each bind is a ``SO_REUSEPORT`` group with one listener per slot
  (``group``), a classic BPF program computes the IP hash over the slots the
  program includes (``bpf``), and each worker accepts from its own listener. The
  master holds every listener but accepts only from the slots the program leaves
  out (no ready worker: dead, starting, replaced, hung or backed up), routing those
  connections to their next choice over the hand-off path, the same one the
  program gives them.

``steering="auto"`` takes the kernel path where it can, ``"kernel"`` insists on it
(an error names what stands in the way), ``"master"`` never takes it.
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Sequence

from ..balancer import Balancer, IPHashBalancer
from ..listener import DEFAULT_BACKLOG, Bind, format_address
from ..sessions import SessionBalancer
from .bpf import attach, rendezvous_program
from .group import ListenerGroup, holders, queue_length

__all__ = ["STEERINGS", "KernelSteering", "kernel_path_unavailable", "open_kernel_steering", "queue_length"]

logger = logging.getLogger("sticky_server.steering")

STEERINGS = ("auto", "kernel", "master")


def kernel_path_unavailable(
    steering: str, balancer: Balancer, binds: Sequence[Bind], reads_client_headers: bool
) -> str | None:
    """Why connections cannot take the kernel path, or None when they can (before trying the kernel)."""
    if steering == "master":
        return "steering='master'"
    if not sys.platform.startswith("linux"):
        return f"kernel steering needs Linux (this is {sys.platform})"
    if reads_client_headers:
        return "the master reads each client's address from a proxy header (proxy_protocol / forwarded_header)"
    if type(balancer) not in (IPHashBalancer, SessionBalancer):
        return f"the balancer is {type(balancer).__name__}; the kernel computes only IPHashBalancer's choice"
    if any(bind.path is not None for bind in binds):
        return "a Unix socket is among the binds (its clients have no address to hash)"
    if any(bind.fd is not None for bind in binds):
        return "an inherited listening socket (fd://) is among the binds; the kernel path creates its own"
    return None


class KernelSteering:
    """The listener groups of every bind, and which slots their program includes."""

    def __init__(self, groups: Sequence[ListenerGroup], balancer: IPHashBalancer) -> None:
        self.groups = list(groups)
        self._ipv4_prefix = balancer.ipv4_prefix
        self._ipv6_prefix = balancer.ipv6_prefix
        self.steered: tuple[int, ...] = ()  # the slots the program includes

    def listeners(self, slot: int) -> list[socket.socket]:
        """``slot``'s listener in every group (created, in order, if the slot is new)."""
        return [group.listener(slot) for group in self.groups]

    @property
    def slots(self) -> int:
        """How many slots have listeners (never fewer than ever served)."""
        return len(self.groups[0].listeners)

    def steer(self, slots: tuple[int, ...]) -> None:
        """Attach the program that spreads new connections over ``slots`` (ascending, not empty).

        Raises OSError with the kernel's reason if it refuses.
        """
        for group in self.groups:
            for slot in range(max(slots) + 1):
                group.listener(slot)
            index_of = {slot: group.index_of(slot) for slot in slots}
            attach(group.live_listener(), rendezvous_program(slots, self._ipv4_prefix, self._ipv6_prefix, index_of))
        self.steered = slots

    def broken(self) -> list[int]:
        """The slots one of whose listeners has stopped listening (master rule 7: replace them)."""
        return sorted(
            {slot for group in self.groups for slot in range(len(group.listeners)) if not group.listening(slot)}
        )

    def replace(self, slot: int) -> None:
        """New listeners for ``slot`` where its old ones stopped listening; steer again with the new order."""
        for group in self.groups:
            if slot < len(group.listeners) and not group.listening(slot):
                group.replace(slot)
        if self.steered:
            self.steer(self.steered)

    def strangers(self) -> str | None:
        """What else listens in this server's groups (a process of the same user joined one), or None."""
        for group in self.groups:
            inodes = group.strangers()
            if inodes:
                pids = holders(inodes)
                who = f"process {', '.join(map(str, pids))}" if pids else f"{len(inodes)} socket(s) of another process"
                return f"{who} listens on {format_address(group.address)} in this server's SO_REUSEPORT group"
        return None

    def queue_length(self, slot: int) -> int:
        """Connections waiting on ``slot``'s listeners, all groups together."""
        return sum(queue_length(group.listeners[slot]) for group in self.groups if slot < len(group.listeners))

    def close(self) -> None:
        for group in self.groups:
            group.close()


def open_kernel_steering(
    binds: Sequence[Bind],
    workers: int,
    balancer: IPHashBalancer,
    backlog: int = DEFAULT_BACKLOG,
    defer_accept: bool = False,
) -> KernelSteering:
    """Bind every group with a listener per slot and steer over all of them (``defer_accept``: see ``group``).

    Raises BindError if an address cannot be used; OSError if the kernel refuses the
    program, ValueError if it would be too long (the caller may then take the master path).
    """
    groups: list[ListenerGroup] = []
    try:
        for bind in binds:
            groups.append(ListenerGroup(bind, backlog, defer_accept))
        steering = KernelSteering(groups, balancer)
        steering.steer(tuple(range(workers)))
    except BaseException:
        for group in groups:
            group.close()
        raise
    return steering
