"""A worker's own CPU per hand-off, without a load generator: the sticky worker loop against a bare recv_fds loop.

    python bench/worker_loop.py [--connections N] [--per-handoff K] [--rounds R]

A separate process plays the master: for every hand-off it makes K socketpairs,
writes a tiny request into one end of each, sends the other ends in one HANDOFF
frame and waits until each of the K has its answer. The worker (this process's main
thread) answers each connection the way ``bench/connections.py`` does (read the
request, write a response, close). Two workers, interleaved over R rounds, fresh
each time:

  sticky    ``WorkerRuntime.run``: the library's worker loop
  recv_fds  the least a Python worker can do: ``socket.recv_fds``, then answer (the
            worker of ``floor`` in ``bench/connections.py``)

It prints the worker thread's CPU time (``time.thread_time``) per connection: the
medians, and their ratio. No load generator, no listening socket and no balancer
are involved, so the figures move by a few percent between runs, not by the tens of
percent that the closed loop's do on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from connections import answer  # the trivial job of every server in bench/connections.py

from sticky_server.protocol.frames import FrameKind, encode, pack_ids
from sticky_server.worker.channel import WorkerChannel
from sticky_server.worker.selector_loop import WorkerRuntime
from sticky_server.worker.session import WorkerSession

REQUEST = b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"
OPEN_CLIENT_ENDS = 64  # the feeder closes its ends of older connections beyond this many


class Trivial:
    def add_connection(self, conn: socket.socket) -> None:
        answer(conn)


def feed(master_end: socket.socket, connections: int, per_handoff: int, sticky: bool) -> None:
    """The master's part, in a child process: hand-offs one at a time, each once the previous one is answered."""
    master_end.settimeout(30)
    if sticky:
        master_end.recv(64)  # READY
    client_ends: list[socket.socket] = []
    next_id = 0
    for _ in range(connections // per_handoff):
        fds, ids = [], []
        for _ in range(per_handoff):
            client, server = socket.socketpair()
            client.settimeout(30)
            client.sendall(REQUEST)
            client_ends.append(client)
            fds.append(server.detach())
            next_id += 1
            ids.append(next_id)
        socket.send_fds(master_end, [encode(FrameKind.HANDOFF, pack_ids(ids), len(fds))], fds)
        for fd in fds:
            os.close(fd)
        for client in client_ends[-per_handoff:]:
            client.recv(4096)  # the answer
        if len(client_ends) > OPEN_CLIENT_ENDS:
            for client in client_ends[: OPEN_CLIENT_ENDS // 2]:
                client.close()
            del client_ends[: OPEN_CLIENT_ENDS // 2]
    if sticky:
        master_end.sendall(encode(FrameKind.STOP))
        master_end.recv(65536)  # until the worker closes its end
    master_end.close()


def run_recv_fds(worker_end: socket.socket) -> None:
    while True:
        _, fds, _, _ = socket.recv_fds(worker_end, 4096, 64)
        if not fds:
            return
        for fd in fds:
            answer(socket.socket(type=socket.SOCK_STREAM, proto=0, fileno=fd))


def measure(mode: str, connections: int, per_handoff: int) -> float:
    """The worker thread's CPU seconds per connection for one fresh run."""
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        worker_end.close()
        try:
            feed(master_end, connections, per_handoff, mode == "sticky")
        finally:
            os._exit(0)
    master_end.close()
    started = time.thread_time()
    if mode == "sticky":
        WorkerRuntime(WorkerSession(Trivial(), WorkerChannel(worker_end), 0)).run()
    else:
        run_recv_fds(worker_end)
        worker_end.close()
    spent = time.thread_time() - started
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"the feeding process failed (status {status})")
    return spent / (connections // per_handoff * per_handoff)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--connections", type=int, default=20000)
    parser.add_argument("--per-handoff", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"sticky": [], "recv_fds": []}
    for round_ in range(args.rounds):
        for mode in results:
            per_connection = measure(mode, args.connections, args.per_handoff) * 1e6
            results[mode].append(per_connection)
            print(f"  round {round_ + 1} {mode:<8} {per_connection:6.1f} us of worker CPU per connection", flush=True)
    sticky, bare = statistics.median(results["sticky"]), statistics.median(results["recv_fds"])
    print(
        f"{args.per_handoff} connection(s) per hand-off, medians of {args.rounds}: sticky {sticky:.1f} us, "
        f"recv_fds {bare:.1f} us per connection ({sticky / bare:.2f}x)"
    )


if __name__ == "__main__":
    main()
