"""The master's figures (README, Stats): per slot and in all, collected on the loop's thread."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .link import Link
from .supervisor import Supervisor

__all__ = ["SlotCounters", "collect", "log_stats"]

logger = logging.getLogger("sticky_server.master")


@dataclass
class SlotCounters:
    """What each slot did over all its workers (a worker's own figures are on its link)."""

    created_at: float = field(default_factory=time.monotonic)
    handed_off: dict[int, int] = field(default_factory=dict)
    lost_no_room: dict[int, int] = field(default_factory=dict)  # hand-offs the kernel closed at the fd limit
    accepted_by_workers: int = 0  # kernel path: connections workers accepted from their own listeners
    moved: dict[int, int] = field(default_factory=dict)  # kernel path, route_by: sent back to be routed again
    messages_dropped: dict[int, int] = field(default_factory=dict)  # channel messages that reached no worker


def collect(
    supervisor: Supervisor, current: Mapping[int, Link], counters: SlotCounters, accepted: int, steering: str
) -> dict[str, Any]:
    """The figures of every slot (its current worker's) and the totals."""
    now = time.monotonic()
    slots: list[dict[str, Any]] = []
    for slot in range(supervisor.size):
        link = current.get(slot)
        slots.append(
            {
                "slot": slot,
                "pid": link.worker.pid if link is not None else None,
                "uptime": round(now - link.worker.started_at, 3) if link is not None else 0.0,
                "ready": bool(link is not None and link.worker.ready_at is not None),
                "handed_off": counters.handed_off.get(slot, 0),
                "live": link.live if link is not None else 0,
                "restarts": supervisor.restarts.get(slot, 0),
                "descriptor_limit": link.descriptor_limit if link is not None else 0,
                "lost_no_room": counters.lost_no_room.get(slot, 0),
                "moved": counters.moved.get(slot, 0),
                "messages_dropped": counters.messages_dropped.get(slot, 0),
            }
        )
    return {
        "pid": os.getpid(),
        "uptime": round(now - counters.created_at, 3),
        "steering": steering,
        "workers": slots,
        "accepted": accepted + counters.accepted_by_workers,
        "handed_off": sum(entry["handed_off"] for entry in slots),
        "live": sum(entry["live"] for entry in slots),
        "restarts": sum(entry["restarts"] for entry in slots),
        "lost_no_room": sum(entry["lost_no_room"] for entry in slots),
        "moved": sum(entry["moved"] for entry in slots),
        "messages_dropped": sum(entry["messages_dropped"] for entry in slots),
    }


def log_stats(figures: dict[str, Any]) -> None:
    """SIGUSR1: the figures in the log, one line for the master and one per slot."""
    logger.info(
        "stats: %d workers, %d connections accepted, %d handed off, %d live, %d restarts",
        len(figures["workers"]),
        figures["accepted"],
        figures["handed_off"],
        figures["live"],
        figures["restarts"],
    )
    for worker in figures["workers"]:
        logger.info(
            "stats: worker %d pid %s up %.0f s: %d handed off, %d live, %d restarts",
            worker["slot"],
            worker["pid"],
            worker["uptime"],
            worker["handed_off"],
            worker["live"],
            worker["restarts"],
        )
