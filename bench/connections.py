"""New connections per second, side by side: plain Python, SO_REUSEPORT, the sticky master, Node sticky-session.

    python bench/connections.py [--workers N] [--rounds R] [--seconds S] [--concurrency C] [--burst K]

Needs gcc (the load generator, ``bench/client.c``, is compiled on first use) and,
for the Node row, ``node`` and ``npm`` (``sticky-session`` is installed from the npm
registry into ``bench/.node``; without them that row is skipped, saying so).

Every server does the same trivial job: accept, read a tiny request, write a fixed
response, close. The servers, started fresh for every measurement and interleaved
over R rounds:

  plain        one Python process (the baseline)
  reuseport    N Python processes on SO_REUSEPORT (the kernel's non-sticky balancing)
  reuseport-worker  the same, each process running the library's own worker loop
               (WorkerRuntime accepting from its listener, as on the kernel path, with
               no master and no program: the like-for-like ceiling of the kernel path)
  floor        the least a Python fd-passing master can do (reference for the master's
               own cost): raw fds, one sendmsg per batch, its copies closed at once
  floor-ack    the same, keeping its copies until the worker acknowledges them (what
               re-routing a dead worker's connections cost before the sticky master
               kept each worker's end of its socket instead)
  sticky       sticky_server as configured by default, N workers, IP hash: on Linux the
               kernel path (a BPF program steers, workers accept their own)
  sticky-master  the same on the master path (steering="master": the master accepts
               and hands off every connection)
  sticky-rr    the same, round-robin
  sticky-proxy the same, IP hash, with the PROXY protocol (the client sends v1 headers)
  sticky-session  the same, routed by session (route_by="engineio"; on the kernel path each
               worker peeks at the request heads it accepts; a request with no sid is a new
               session, placed by IP hash with bounded loads): the cost against sticky
  sticky-session-master  routed by session on the master path (the master peeks at each
               request head): the cost against sticky-master
  node         Node's sticky-session with N workers

Two loads, both from 64 client addresses (``--sources``), a new TCP connection per request:

  closed  C connections kept in flight for S seconds: rate, p50/p99 latency
  burst   every server process paused (SIGSTOP), K connections queued with their
          requests written, then resumed: the time until every answer is in

``--soak N`` instead pushes N connections (e.g. 1000000) through one sticky master
and prints its RSS and open descriptors at the start and the end (``--soak-config
sticky-master`` for the master path).

Master CPU per connection is the master's own CPU time (all its threads, from
``/proc/PID/task/*/schedstat``) over the closed-loop run, divided by the connections
served; "rest" is the same for all the other server processes together (the
workers; for reuseport, the other processes). The burst's "cpu us" is the master's
CPU time from its resumption until the last answer, divided by the connections
drained: its cost per connection when it takes them in batches. It prints medians
and the ratios of every row to plain and to reuseport.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CLIENT_SOURCE = HERE / "client.c"
CLIENT = HERE / ".build" / "client"
NODE_DIR = HERE / ".node"
HOST = "127.0.0.1"
SOURCES = 64
BACKLOG = 4096
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nConnection: close\r\n\r\nHello, world!"
CONFIGS = (
    "plain",
    "reuseport",
    "reuseport-worker",
    "floor",
    "floor-ack",
    "sticky",
    "sticky-master",
    "sticky-rr",
    "sticky-proxy",
    "sticky-session",
    "sticky-session-master",
    "node",
)
TICKS = os.sysconf("SC_CLK_TCK")

NODE_SERVER = """
const sticky = require('sticky-session');
const http = require('http');
const server = http.createServer((req, res) => {
  res.writeHead(200, {'Content-Length': 13, 'Connection': 'close'});
  res.end('Hello, world!');
});
if (!sticky.listen(server, Number(process.env.BENCH_PORT), {workers: Number(process.env.BENCH_WORKERS)})) {
  server.once('listening', () => console.log('READY'));
}
"""


# --- the servers (this file, started with BENCH_ROLE) ----------------------------


def answer(conn: socket.socket) -> None:
    """The trivial job every Python server here does with a connection."""
    try:
        conn.recv(4096)
        conn.sendall(RESPONSE)
    except OSError:
        pass
    conn.close()


def serve_forever(listener: socket.socket) -> None:
    while True:
        answer(listener.accept()[0])


def run_plain(port: int, processes: int) -> None:
    reuse = processes > 1
    children = []
    for _ in range(processes - 1):
        pid = os.fork()
        if pid == 0:
            break
        children.append(pid)
    listener = socket.socket()
    if reuse:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, port))
    listener.listen(BACKLOG)
    if len(children) == processes - 1:  # the first process: the others are up once it is
        print("READY", flush=True)
    serve_forever(listener)


def run_reuseport_worker(port: int, processes: int) -> None:
    """``processes`` processes on SO_REUSEPORT, each accepting with the library's WorkerRuntime, no master."""
    sys.path.insert(0, str(HERE.parent))
    from sticky_server.worker.channel import WorkerChannel
    from sticky_server.worker.selector_loop import WorkerRuntime
    from sticky_server.worker.session import WorkerSession

    class Trivial:
        def add_connection(self, conn: socket.socket) -> None:
            answer(conn)

    slot = 0
    for child in range(1, processes):
        if os.fork() == 0:
            slot = child
            break
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, port))
    listener.listen(BACKLOG)
    listener.setblocking(False)
    # The frames the worker sends (READY, its accept and close counts) go to an end nobody reads;
    # a few bytes per half second, far from filling the socket's buffer in a run.
    unread_master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if slot == 0:
        print("READY", flush=True)
    WorkerRuntime(WorkerSession(Trivial(), WorkerChannel(worker_end), slot, listeners=[listener])).run()
    del unread_master_end


def run_floor(port: int, workers: int, keep_until_ack: bool) -> None:
    """The least a Python fd-passing master can do, as a reference for the sticky master's own cost.

    It accepts raw descriptors, passes each wake-up's batch to a worker in one
    ``sendmsg`` and closes its copies at once: no balancer, no supervision, and a
    worker that dies loses what was in flight. ``keep_until_ack`` (floor-ack) keeps
    its copies until the worker acknowledges them, as the sticky master did before it
    kept the worker's end of the socket instead (README, How it works).
    """
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(workers)]
    for _, worker_end in pairs:
        if os.fork() == 0:
            for master_end, _ in pairs:
                master_end.close()
            while True:
                _, fds, _, _ = socket.recv_fds(worker_end, 4096, 64)
                if not fds:
                    os._exit(0)
                if keep_until_ack:
                    worker_end.sendall(b"a" * len(fds))
                for fd in fds:
                    answer(socket.socket(type=socket.SOCK_STREAM, proto=0, fileno=fd))
    ends = [master_end for master_end, _ in pairs]
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, port))
    listener.listen(BACKLOG)
    listener.setblocking(False)
    accept = listener._accept  # type: ignore[attr-defined]
    poll = select.epoll()
    poll.register(listener.fileno(), select.EPOLLIN)
    slot_of_end = {}
    if keep_until_ack:
        for slot, end in enumerate(ends):
            poll.register(end.fileno(), select.EPOLLIN)
            slot_of_end[end.fileno()] = slot
    print("READY", flush=True)
    batches: list[list[int]] = [[] for _ in range(workers)]
    unacked: list[list[int]] = [[] for _ in range(workers)]
    while True:
        for fd, _ in poll.poll():
            slot = slot_of_end.get(fd)
            if slot is not None:
                count = len(ends[slot].recv(65536))
                for acked in unacked[slot][:count]:
                    os.close(acked)
                del unacked[slot][:count]
        for _ in range(64):
            try:
                fd, address = accept()
            except BlockingIOError:
                break
            batches[hash(address[0]) % workers].append(fd)
        for slot, batch in enumerate(batches):
            if batch:
                socket.send_fds(ends[slot], [b"x" * len(batch)], batch)
                if keep_until_ack:
                    unacked[slot].extend(batch)
                else:
                    for fd in batch:
                        os.close(fd)
                batch.clear()


def run_sticky(port: int, workers: int, balancer: str, proxy: bool, steering: str, route_by: str | None = None) -> None:
    sys.path.insert(0, str(HERE.parent))
    from sticky_server import StickyServer

    class Trivial:
        def add_connection(self, conn: socket.socket) -> None:
            answer(conn)

    sticky = StickyServer(
        workers=workers,
        balancer=balancer,
        proxy_protocol=proxy,
        graceful_timeout=5,
        steering=steering,
        route_by=route_by,
    )
    if sticky.is_master:
        sticky.on_listening(lambda address: print("READY", flush=True))
        profile = os.environ.get("BENCH_PROFILE")  # a file for the master's cProfile statistics
        if profile:
            import cProfile

            cProfile.runctx("sticky.listen(port, host=HOST)", globals(), locals(), profile)
        else:
            sticky.listen(port, host=HOST)
    elif os.environ.get("BENCH_PROFILE") and sticky.worker_id == 0:
        import cProfile

        cProfile.runctx("sticky.work(Trivial())", globals(), locals(), os.environ["BENCH_PROFILE"] + ".worker0")
    else:
        sticky.work(Trivial())


# --- the driver ------------------------------------------------------------------


def build_client() -> Path:
    if not CLIENT.exists() or CLIENT.stat().st_mtime < CLIENT_SOURCE.stat().st_mtime:
        CLIENT.parent.mkdir(exist_ok=True)
        subprocess.run(["gcc", "-O2", "-o", str(CLIENT), str(CLIENT_SOURCE)], check=True, timeout=120)
    return CLIENT


def node_ready() -> str | None:
    """None if the Node row can run, else why not."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node/npm not found"
    if not (NODE_DIR / "node_modules" / "sticky-session").exists():
        NODE_DIR.mkdir(exist_ok=True)
        result = subprocess.run(
            ["npm", "install", "--silent", "--prefix", str(NODE_DIR), "sticky-session@1.1.2"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            return f"npm install sticky-session failed: {result.stderr.strip()[-200:]}"
    (NODE_DIR / "server.js").write_text(NODE_SERVER)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` so far, to the nanosecond (``schedstat``; ``stat`` counts in ticks)."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                total += int((task / "schedstat").read_text().split()[0])
    except OSError:
        total = 0
    if total:
        return total / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


class Server:
    def __init__(self, config: str, workers: int) -> None:
        self.port = free_port()
        env = dict(os.environ, BENCH_PORT=str(self.port), BENCH_WORKERS=str(workers), PYTHONUNBUFFERED="1")
        if config == "node":
            command = ["node", str(NODE_DIR / "server.js")]
            env["NODE_PATH"] = str(NODE_DIR / "node_modules")
        else:
            command = [sys.executable, str(Path(__file__).resolve())]
            env["BENCH_ROLE"] = config
        self.process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != b"READY":
            self.stop()
            raise RuntimeError(f"the {config} server did not start: {line!r}")
        self.proxy = config == "sticky-proxy"
        deadline = time.monotonic() + 20
        while not self._answers():  # Node says READY before its workers listen
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the {config} server does not answer")
            time.sleep(0.1)

    def _answers(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=2) as sock:
                if self.proxy:
                    sock.sendall(b"PROXY TCP4 127.0.0.9 127.0.0.1 1000 %d\r\n" % self.port)
                sock.sendall(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
                return sock.recv(100).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def processes(self) -> list[int]:
        pids = [self.process.pid]
        for pid in list(pids):
            pids += children_of(pid)
        return pids

    def stop(self) -> None:
        started = self.processes() if self.process.poll() is None else []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        deadline = time.monotonic() + 10
        for pid in started[1:]:  # the forks of plain/reuseport do not follow their parent
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    break
                time.sleep(0.01)


def parse_done(line: str) -> dict[str, float]:
    _, ok, errors, seconds, p50, p99 = line.split()
    return {"ok": int(ok), "errors": int(errors), "seconds": float(seconds), "p50": float(p50), "p99": float(p99)}


def closed_loop(server: Server, concurrency: int, seconds: int, sources: int = SOURCES) -> dict[str, float]:
    proxy = "1" if server.proxy else "0"
    master_before = cpu_seconds(server.process.pid)
    others = server.processes()[1:]
    others_before = sum(cpu_seconds(pid) for pid in others)
    result = subprocess.run(
        [str(CLIENT), HOST, str(server.port), "closed", str(concurrency), str(seconds), str(sources), proxy],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    )
    figures = parse_done(result.stdout.strip().splitlines()[-1])
    figures["rate"] = figures["ok"] / figures["seconds"]
    served = max(figures["ok"], 1)
    figures["cpu_us"] = (cpu_seconds(server.process.pid) - master_before) / served * 1e6
    figures["others_us"] = (sum(cpu_seconds(pid) for pid in others) - others_before) / served * 1e6
    return figures


def burst(server: Server, count: int, sources: int = SOURCES) -> dict[str, float]:
    proxy = "1" if server.proxy else "0"
    pids = server.processes()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    client = subprocess.Popen(
        [str(CLIENT), HOST, str(server.port), "burst", str(count), "30", str(sources), proxy],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None and client.stdout is not None
    try:
        queued = client.stdout.readline().split()
        master_before = cpu_seconds(server.process.pid)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        client.stdin.write("go\n")
        client.stdin.flush()
        figures = parse_done(client.stdout.readline())
        master_after = cpu_seconds(server.process.pid)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        client.wait(60)
    figures["queued"] = int(queued[1]) if len(queued) == 2 else 0
    figures["rate"] = figures["ok"] / figures["seconds"]
    figures["cpu_us"] = (master_after - master_before) / max(figures["ok"], 1) * 1e6
    return figures


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def soak(total: int, workers: int, concurrency: int, config: str = "sticky") -> None:
    """Push ``total`` connections through one sticky master; its RSS and open fds must stay flat."""
    server = Server(config, workers)
    try:
        master = server.process.pid
        closed_loop(server, concurrency, 2)  # warm-up: caches, allocator pools
        start_rss, start_fds = rss_kib(master), len(os.listdir(f"/proc/{master}/fd"))
        print(f"soak: master pid {master}: RSS {start_rss} KiB, {start_fds} open fds after warm-up", flush=True)
        served = errors = 0
        began = time.monotonic()
        while served < total:
            figures = closed_loop(server, concurrency, 20)
            served += int(figures["ok"])
            errors += int(figures["errors"])
            print(
                f"soak: {served:,} connections, {errors} errors, RSS {rss_kib(master)} KiB, "
                f"{len(os.listdir(f'/proc/{master}/fd'))} fds, {figures['rate']:.0f}/s",
                flush=True,
            )
        end_rss, end_fds = rss_kib(master), len(os.listdir(f"/proc/{master}/fd"))
        print(
            f"soak: {served:,} connections in {time.monotonic() - began:.0f} s, {errors} errors; master RSS "
            f"{start_rss} -> {end_rss} KiB ({end_rss - start_rss:+d} KiB), open fds {start_fds} -> {end_fds}"
        )
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--burst", type=int, default=4000)
    parser.add_argument("--sources", type=int, default=SOURCES, help=f"client addresses (default {SOURCES})")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--soak", type=int, metavar="N", help="instead: N connections through one sticky master")
    parser.add_argument(
        "--soak-config", default="sticky", help="the server the soak runs: sticky (kernel path) or sticky-master"
    )
    args = parser.parse_args()
    build_client()
    if args.soak:
        soak(args.soak, args.workers, args.concurrency, args.soak_config)
        return
    configs = [name for name in args.configs.split(",") if name]
    if "node" in configs:
        why = node_ready()
        if why:
            print(f"node: skipped ({why})")
            configs.remove("node")
    results: dict[str, dict[str, list[float]]] = {name: {} for name in configs}
    print(
        f"{args.workers} workers, {args.rounds} rounds; closed loop: {args.concurrency} in flight for "
        f"{args.seconds} s; burst: {args.burst} queued; {args.sources} client addresses",
        flush=True,
    )
    for round_ in range(args.rounds):
        for config in configs:
            server = Server(config, args.workers)
            try:
                closed_loop(server, args.concurrency, 1, args.sources)  # warm-up
                closed = closed_loop(server, args.concurrency, args.seconds, args.sources)
                drained = burst(server, args.burst, args.sources)
            finally:
                server.stop()
            into = results[config]
            for key, value in (
                ("closed", closed["rate"]),
                ("p50", closed["p50"]),
                ("p99", closed["p99"]),
                ("cpu_us", closed["cpu_us"]),
                ("others_us", closed["others_us"]),
                ("closed_errors", closed["errors"]),
                ("burst", drained["rate"]),
                ("burst_s", drained["seconds"]),
                ("burst_errors", drained["errors"]),
                ("burst_cpu_us", drained["cpu_us"]),
            ):
                into.setdefault(key, []).append(value)
            print(
                f"  round {round_ + 1} {config:<12} closed {closed['rate']:8.0f}/s p50 {closed['p50']:7.0f} us "
                f"p99 {closed['p99']:7.0f} us master {closed['cpu_us']:6.1f} us/conn, rest {closed['others_us']:5.1f} "
                f"err {closed['errors']:.0f} | "
                f"burst {drained['queued']:.0f} in {drained['seconds']:.3f} s ({drained['rate']:.0f}/s) "
                f"master {drained['cpu_us']:.1f} us/conn err {drained['errors']:.0f}",
                flush=True,
            )
    median = {
        name: {key: statistics.median(values) for key, values in figures.items()} for name, figures in results.items()
    }
    print()
    print(
        f"{'medians':<12} {'closed/s':>9} {'p50 us':>7} {'p99 us':>7} {'cpu us':>7} {'rest us':>7} {'burst/s':>8} "
        f"{'cpu us':>7}   "
        "closed vs plain, reuseport | burst vs plain, reuseport"
    )
    for name, m in median.items():
        ratios = ""
        if "plain" in median and "reuseport" in median:
            plain, reuse = median["plain"], median["reuseport"]
            ratios = (
                f"{m['closed'] / plain['closed']:.2f}x {m['closed'] / reuse['closed']:.2f}x | "
                f"{m['burst'] / plain['burst']:.2f}x {m['burst'] / reuse['burst']:.2f}x"
            )
        print(
            f"{name:<12} {m['closed']:>9.0f} {m['p50']:>7.0f} {m['p99']:>7.0f} {m['cpu_us']:>7.1f} "
            f"{m['others_us']:>7.1f} {m['burst']:>8.0f} {m['burst_cpu_us']:>7.1f}   {ratios}"
        )
    if "node" in median:
        node = median["node"]
        for name in ("sticky", "sticky-master", "sticky-rr", "sticky-proxy", "sticky-session", "sticky-session-master"):
            if name in median:
                m = median[name]
                print(
                    f"{name} vs node sticky-session: {m['closed'] / node['closed']:.2f}x the rate, "
                    f"p99 {m['p99'] / node['p99']:.2f}x"
                )


if __name__ == "__main__":
    role = os.environ.get("BENCH_ROLE")
    port = int(os.environ.get("BENCH_PORT", "0"))
    workers = int(os.environ.get("BENCH_WORKERS", "2"))
    if role == "plain":
        run_plain(port, 1)
    elif role == "reuseport":
        run_plain(port, workers)
    elif role in ("floor", "floor-ack"):
        run_floor(port, workers, role == "floor-ack")
    elif role == "reuseport-worker":
        run_reuseport_worker(port, workers)
    elif role in ("sticky", "sticky-master", "sticky-rr", "sticky-proxy", "sticky-session", "sticky-session-master"):
        balancer = "round-robin" if role == "sticky-rr" else "ip-hash"
        steering = "master" if role in ("sticky-master", "sticky-session-master") else "auto"
        route_by = "engineio" if role.startswith("sticky-session") else None
        run_sticky(port, workers, balancer, role == "sticky-proxy", steering, route_by)
    else:
        main()
