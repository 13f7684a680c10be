"""The environment variables by which the master tells a process it spawns that it is a worker.

The master re-executes the entry script with the number of the inherited control
socket and the worker's slot (and, on the kernel path, its listeners' numbers);
``worker.environment`` reads them once and removes them.
"""

from __future__ import annotations

import os

__all__ = ["CONTROL_FD_ENV", "LAUNCH_CWD", "LISTENER_FDS_ENV", "MAPPED_PEERS_ENV", "WORKER_SLOT_ENV"]

CONTROL_FD_ENV = "STICKY_SERVER_CONTROL_FD"
WORKER_SLOT_ENV = "STICKY_SERVER_WORKER_SLOT"
LISTENER_FDS_ENV = "STICKY_SERVER_LISTENER_FDS"
# Set when a listener is IPv6 taking IPv4 clients too: the descriptor names those peers
# ``::ffff:a.b.c.d`` (the worker's sockets say ``a.b.c.d``; uvloop reads the descriptor).
MAPPED_PEERS_ENV = "STICKY_SERVER_MAPPED_PEERS"
# Workers are started in the directory the program was started in, so that a
# relative script path or `-m package` resolves the same way in every worker.
LAUNCH_CWD = os.getcwd()
