"""The worker slots' lifecycle: the supervisor decides, the master's loop carries out.

Theory of operation
-------------------
A slot is a place for one worker. It has one *current* process, the one its
connections are routed to; during a reload or a recycle also a *replacement*
that is starting, which becomes current once it is ready (master rule 4); and
perhaps old processes *finishing* what they hold. Each process moves through
these states, and only the supervisor moves it:

| state | entered when | left when |
|---|---|---|
| ``STARTING`` | spawned | it says READY (-> ``READY``); told to stop |
| ``READY`` | it said READY | silent past ``timeout`` (-> ``HUNG``); told to stop |
| ``HUNG`` | silent past ``timeout``: SIGABRT now, SIGKILL ``ABORT_GRACE`` later | it exits |
| ``STOPPING`` | sent STOP or SIGQUIT, or lost its control socket; SIGKILL at a deadline | it exits |

Every state ends when the process exits (``exited``): a current process's slot
restarts after a delay from ``RestartPolicy``, at once if the worker had been up
and healthy, otherwise after an exponentially growing back-off, so a worker that
crashes at start-up costs a few spawns a second at first and one every
``BACKOFF_MAX`` seconds after that, never a fork loop. A slot whose workers fail
to start ``MAX_BOOT_FAILURES`` times in a row, or any worker that fails before
the server first started, stops the server.

Events come in as method calls (``boot``, ``ready``, ``exited``, ``due``,
``reload``, ``replace``, ``grow``, ``shrink``, ``stop``, ``stop_workers``,
``lost_control``). Each returns the decisions for the loop, to carry out in
order: ``Connect`` (a new process: open its link), ``SendStop`` (STOP after every
hand-off already queued for it), ``Ping``, ``Listening`` (every slot's first
worker is ready) and ``Halt`` (workers cannot start: stop the server); they are
``decisions``'. Signals to processes the supervisor sends itself. Its deadlines
(restarts, kills, the next heartbeat: ``deadlines``) have one earliest time,
``next_deadline``, for the loop's ``select`` timeout; when a slot starts again is
``restarts.RestartPolicy``'s answer.

Which states take connections is the supervisor's answer too (``takes_connections``):
``STARTING`` and ``READY`` on the master path (hand-offs wait in a starting worker's
socket), ``READY`` alone on the kernel path (``routes_to_starting=False``: the
program sends a starting worker's clients to their next choice).

The supervisor never blocks: reaping is ``Popen.poll()`` on each live process
when the loop sees SIGCHLD, and respawns are deadlines. The only wait is in
``shut_down``, for processes just sent SIGKILL.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence

from ..errors import WorkerBootError
from ..protocol.environment import LAUNCH_CWD
from .deadlines import Deadlines
from .decisions import Connect, Decision, Halt, Listening, Ping, SendStop, StopMode
from .process import Launcher, SpawnFunction, WorkerProcess, WorkerState, describe_exit, entry_command, spawn_worker
from .restarts import RestartPolicy, halt

__all__ = [
    "ABORT_GRACE",
    "HEARTBEATS_PER_TIMEOUT",
    "QUICK_STOP_SECONDS",
    "Supervisor",
]

logger = logging.getLogger("sticky_server.supervisor")

# Heartbeats per `timeout`; a hung worker gets this long after SIGABRT before SIGKILL.
HEARTBEATS_PER_TIMEOUT = 3
ABORT_GRACE = 1.0
# A quick stop kills workers still running this long after their SIGQUIT.
QUICK_STOP_SECONDS = 2.0
# How long shut_down waits for a SIGKILLed worker to be reaped.
KILL_WAIT = 5.0


class Supervisor:
    """The worker slots of one master and every decision about their processes (module docstring)."""

    def __init__(
        self,
        size: int,
        command: Sequence[str] | None = None,
        *,
        cwd: str = LAUNCH_CWD,
        policy: RestartPolicy | None = None,
        spawn: SpawnFunction = spawn_worker,
        clock: Callable[[], float] = time.monotonic,
        user: int | None = None,
        group: int | None = None,
        graceful_timeout: float = 30.0,
        timeout: float | None = None,
        listeners_for: Callable[[int], Sequence[socket.socket]] | None = None,
        routes_to_starting: bool = True,
    ) -> None:
        self.size = size
        credentials = {name: value for name, value in (("user", user), ("group", group)) if value is not None}
        command = list(command) if command is not None else entry_command()
        self._launcher = Launcher(command, cwd, spawn, credentials, listeners_for)
        # Whether a starting worker takes connections: on the master path they wait in its socket;
        # on the kernel path its clients go to their next choice until it is ready.
        self._routable = _ROUTABLE if routes_to_starting else frozenset({WorkerState.READY})
        self.policy = policy or RestartPolicy()
        self.graceful_timeout = graceful_timeout
        self.timeout = timeout  # heartbeat: a ready worker silent this long is killed (None: no heartbeat)
        self.current: dict[int, WorkerProcess] = {}
        self.replacements: dict[int, WorkerProcess] = {}  # starting, current once ready (one at a time)
        self.processes: set[WorkerProcess] = set()  # every live process: current, starting, finishing
        self.restarts: dict[int, int] = {}  # per slot: workers restarted after an unexpected exit
        self.started = False  # every slot's first worker was ready once
        self.stopping = False
        self._deadlines = Deadlines()  # restarts, kills, the next heartbeat
        self._replace_queue: deque[int] = deque()
        self._clock = clock

    @property
    def next_deadline(self) -> float | None:
        """The earliest deadline (a restart, a kill, the heartbeat): the loop calls ``due`` then."""
        return self._deadlines.earliest

    # --- events -----------------------------------------------------------------

    def boot(self) -> list[Decision]:
        """Start every slot's first worker; raises WorkerBootError if the OS cannot create one."""
        decisions: list[Decision] = []
        for slot in range(self.size):
            try:
                decisions.append(Connect(self._start(slot)))
            except OSError as exc:
                raise WorkerBootError(f"{self._launcher.error(slot, exc)}; the server did not start") from None
        if self.timeout:
            self._deadlines.heartbeat(self._clock() + self.timeout / HEARTBEATS_PER_TIMEOUT)
        return decisions

    def ready(self, worker: WorkerProcess) -> list[Decision]:
        """``worker`` said READY: promote it if it is a replacement; say when the server has started."""
        worker.ready_at = self._clock()
        if worker.state is WorkerState.STARTING:
            worker.state = WorkerState.READY
        self.policy.ready(worker.slot)
        if self.stopping:
            return []
        decisions: list[Decision] = []
        if self.replacements.get(worker.slot) is worker:
            decisions += self._promote(worker)  # (a reload can finish before the server has started)
        if not self.started and all(
            slot in self.current and self.current[slot].ready_at is not None for slot in range(self.size)
        ):
            self.started = True
            decisions.append(Listening())
        return decisions

    def reap(self) -> list[tuple[WorkerProcess, int]]:
        """The processes that exited, with their return codes (call ``exited`` for each once its link is closed)."""
        exited: list[tuple[WorkerProcess, int]] = []
        for worker in list(self.processes):
            returncode = worker.process.poll()
            if returncode is not None:
                self.processes.discard(worker)
                exited.append((worker, returncode))
        return exited

    def exited(self, worker: WorkerProcess, returncode: int) -> list[Decision]:
        """``worker`` exited: abandon a reload, restart its slot, or halt (module docstring)."""
        self._deadlines.forget_kill(worker)
        slot = worker.slot
        how = describe_exit(returncode)
        if self.replacements.get(slot) is worker:
            del self.replacements[slot]
            self._replace_queue.clear()
            logger.error(
                "the new worker for slot %d (pid %d) %s before it was ready; keeping the running worker "
                "and abandoning the reload (its error is printed above)",
                slot,
                worker.pid,
                how,
            )
            return []
        current = self.current.get(slot) is worker
        if current:
            del self.current[slot]
        if self.stopping or not current or slot >= self.size:
            logger.info("worker %d (pid %d) %s", slot, worker.pid, how)
            return self._next_replacement()
        if not self.started and worker.ready_at is None:
            logger.error("worker %d (pid %d) %s before it was ready", slot, worker.pid, how)
            return [halt(f"worker {slot} (pid {worker.pid}) {how} before it was ready, so the server did not start")]
        restart = self.policy.after_exit(worker, how, self._clock())
        if isinstance(restart, Halt):
            return [restart]
        self._deadlines.restart(slot, self._clock() + restart)
        self.restarts[slot] = self.restarts.get(slot, 0) + 1
        return self._next_replacement()

    def due(self, now: float, last_heard: Callable[[WorkerProcess], float | None]) -> list[Decision] | None:
        """What is due at ``now``: restarts, kills, the heartbeat; None if nothing was (the loop asks every turn).

        ``last_heard(worker)`` is when the loop last read from the worker (None: its link is closed).
        """
        deadlines = self._deadlines
        if deadlines.earliest is None or now < deadlines.earliest:
            return None
        decisions: list[Decision] = []
        for slot in deadlines.due_restarts(now):
            try:
                decisions.append(Connect(self._start(slot)))
            except OSError as exc:
                self.spawn_failed(slot, exc)
        for worker, why in deadlines.due_kills(now):
            if worker.process.poll() is None:
                logger.warning("worker %d (pid %d) %s; killing it", worker.slot, worker.pid, why)
                worker.process.kill()
        if deadlines.heartbeat_due(now):
            decisions += self._heartbeat(now, last_heard)
        return decisions

    def reload(self) -> list[Decision]:
        """SIGHUP: replace every slot's worker, one slot at a time (master rule 4)."""
        if self.stopping:
            return []
        logger.info("SIGHUP: replacing %d workers one by one", len(self.current))
        for slot in sorted(self.current):
            self._queue_replacement(slot, "reload")
        return self._next_replacement()

    def replace(self, slot: int, why: str) -> list[Decision]:
        """Replace ``slot``'s worker (a recycle), after any replacement under way."""
        if self.stopping:
            return []
        self._queue_replacement(slot, why)
        return self._next_replacement()

    def grow(self) -> list[Decision]:
        """SIGTTIN: one slot more."""
        if self.stopping:
            return []
        slot = self.size
        self.size += 1
        logger.info("SIGTTIN: %d workers now", self.size)
        try:
            return [Connect(self._start(slot))]
        except OSError as exc:
            self.spawn_failed(slot, exc)
            return []

    def shrink(self) -> list[Decision]:
        """SIGTTOU: one slot fewer; the last slot's workers stop gracefully and are not restarted."""
        if self.stopping:
            return []
        if self.size == 1:
            logger.warning("SIGTTOU: already down to one worker; keeping it")
            return []
        self.size -= 1
        slot = self.size
        logger.info("SIGTTOU: %d workers now; stopping worker %d", slot, slot)
        self._deadlines.forget_restart(slot)
        decisions: list[Decision] = []
        for table in (self.current, self.replacements):
            worker = table.pop(slot, None)
            if worker is not None:
                decisions += self._stop_worker(worker)
        return decisions + self._next_replacement()

    def stop(self, why: str, mode: StopMode) -> None:
        """Begin stopping (master rule 5); a second stop kills every worker now.

        A graceful stop sends nothing yet: the loop calls ``stop_workers`` once every
        accepted connection is routed.
        """
        if self.stopping:
            logger.warning("%s while stopping: killing the workers now", why)
            self.kill_all()
            return
        self.stopping = True
        self._deadlines.forget_restarts()
        self._replace_queue.clear()
        if mode is StopMode.KILL:
            self.kill_all()
        elif mode is StopMode.QUICK:
            logger.info("%s: quick stop", why)
            seconds = min(QUICK_STOP_SECONDS, self.graceful_timeout)
            for worker in self.processes:
                worker.state = WorkerState.STOPPING
                self._kill_after(worker, seconds, f"did not exit within {QUICK_STOP_SECONDS:.1f} s of SIGQUIT")
            self.kill_all(signal.SIGQUIT)
        else:
            waiting = (why, self.graceful_timeout, len(self.processes))
            logger.info("%s: stopping; waiting up to %.1f s for %d workers to finish", *waiting)

    def stop_workers(self) -> list[Decision]:
        """Graceful stop: STOP to every process not told yet, each killed ``graceful_timeout`` later."""
        decisions: list[Decision] = []
        for worker in sorted(self.processes, key=lambda worker: (worker.slot, worker.started_at)):
            if worker.state is not WorkerState.STOPPING:
                decisions += self._stop_worker(worker)
        return decisions

    def lost_control(self, worker: WorkerProcess) -> None:
        """``worker``'s control socket closed: it can do nothing useful; kill it if it does not exit on its own."""
        if self.stopping or worker.process.poll() is not None or self._deadlines.kills(worker):
            return
        worker.state = WorkerState.STOPPING
        self._kill_after(worker, self.graceful_timeout, "lost its control socket and did not exit")

    def kill(self, worker: WorkerProcess) -> None:
        """SIGKILL ``worker`` now (its frames could not be handled); it is reaped and replaced."""
        worker.state = WorkerState.STOPPING
        with contextlib.suppress(ProcessLookupError):
            worker.process.kill()

    def kill_all(self, signum: int = signal.SIGKILL) -> None:
        """Send ``signum`` to every live worker process."""
        for worker in self.processes:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signum)

    def shut_down(self) -> list[WorkerProcess]:
        """Kill every process and wait for them; return them all (the loop closes what it holds of each)."""
        self.stopping = True
        self._deadlines = Deadlines()
        self.kill_all()
        for worker in self.processes:
            worker.state = WorkerState.STOPPING
            try:
                worker.process.wait(timeout=KILL_WAIT)
            except subprocess.TimeoutExpired:
                logger.error("worker %d (pid %d) survived SIGKILL for %.0f s", worker.slot, worker.pid, KILL_WAIT)
        gone = list(self.processes)
        self.processes.clear()
        self.current.clear()
        self.replacements.clear()
        return gone

    # --- what the loop asks -----------------------------------------------------

    def takes_connections(self, worker: WorkerProcess) -> bool:
        """Whether ``worker`` may be routed to, as far as its lifecycle goes (the link says the rest)."""
        return worker.state in self._routable and self.current.get(worker.slot) is worker

    def spawn_failed(self, slot: int, error: OSError) -> None:
        """Back off after the OS refused to create a process for ``slot``."""
        delay = self.policy.delay(slot, False, 0.0)
        self._deadlines.restart(slot, self._clock() + delay)
        logger.error("%s; trying again in %.1f s", self._launcher.error(slot, error), delay)

    # --- the parts --------------------------------------------------------------

    def _spawn_process(self, slot: int) -> WorkerProcess:
        worker = self._launcher.launch(slot, self._clock())
        self.processes.add(worker)
        logger.info("worker %d started (pid %d)", slot, worker.pid)
        return worker

    def _start(self, slot: int) -> WorkerProcess:
        """Start the current process of the empty ``slot``; raises OSError if it cannot."""
        worker = self._spawn_process(slot)
        self.current[slot] = worker
        return worker

    def _promote(self, worker: WorkerProcess) -> list[Decision]:
        slot = worker.slot
        del self.replacements[slot]
        previous = self.current.get(slot)
        self.current[slot] = worker
        decisions: list[Decision] = []
        if previous is not None:
            logger.info("worker %d replaced: pid %d now, pid %d finishing", slot, worker.pid, previous.pid)
            decisions += self._stop_worker(previous)
        return decisions + self._next_replacement()

    def _queue_replacement(self, slot: int, why: str) -> None:
        if slot in self._replace_queue or slot in self.replacements:
            return
        logger.info("replacing worker %d: %s", slot, why)
        self._replace_queue.append(slot)

    def _next_replacement(self) -> list[Decision]:
        if self.replacements or self.stopping:
            return []
        while self._replace_queue:
            slot = self._replace_queue.popleft()
            if slot >= self.size or slot not in self.current:
                continue  # gone, or restarting anyway: its next worker runs the new code
            try:
                worker = self._spawn_process(slot)
            except OSError as exc:
                logger.error("could not start a replacement for worker %d (%s); keeping the running one", slot, exc)
                continue
            self.replacements[slot] = worker
            return [Connect(worker)]
        return []

    def _stop_worker(self, worker: WorkerProcess) -> list[Decision]:
        worker.state = WorkerState.STOPPING
        self._kill_after(worker, self.graceful_timeout, f"did not exit within {self.graceful_timeout:.1f} s")
        return [SendStop(worker)]

    def _heartbeat(self, now: float, last_heard: Callable[[WorkerProcess], float | None]) -> list[Decision]:
        """Ping every ready current worker; abort those silent for ``timeout``."""
        assert self.timeout is not None
        self._deadlines.heartbeat(now + self.timeout / HEARTBEATS_PER_TIMEOUT)
        decisions: list[Decision] = []
        for worker in list(self.current.values()):
            heard = last_heard(worker)
            if worker.state is not WorkerState.READY or heard is None:
                continue
            if now - heard > self.timeout:
                worker.state = WorkerState.HUNG
                logger.error(
                    "worker %d (pid %d) has not answered for %.1f s; killing it (SIGABRT, then SIGKILL)",
                    worker.slot,
                    worker.pid,
                    now - heard,
                )
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGABRT)
                self._kill_after(worker, ABORT_GRACE, "did not exit on SIGABRT", now)
            else:
                decisions.append(Ping(worker))
        return decisions

    def _kill_after(self, worker: WorkerProcess, seconds: float, why: str, now: float | None = None) -> None:
        self._deadlines.kill(worker, (self._clock() if now is None else now) + seconds, why)


_ROUTABLE = frozenset({WorkerState.STARTING, WorkerState.READY})
