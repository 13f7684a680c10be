"""The worker's seccomp lock-down, installed in a child process (it cannot be taken off again)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from sticky_server.worker.lockdown import lockdown_program

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "aarch64"),
    reason="seccomp lock-down: Linux on x86-64 or arm64",
)

CHILD = r"""
import asyncio, errno, fcntl, json, os, socket, subprocess, threading
from sticky_server.worker.lockdown import lock_down_listeners, retire_listener
listener = socket.create_server(("127.0.0.1", 0), reuse_port=True)
other = socket.create_server(("127.0.0.1", 0))
results = {"locked": lock_down_listeners([listener.fileno()])}
def attempt(name, call):
    try:
        call()
        results[name] = "ok"
    except OSError as exc:
        results[name] = errno.errorcode[exc.errno]
attempt("shutdown listener", lambda: listener.shutdown(socket.SHUT_RDWR))
attempt("connect listener", lambda: listener.connect(("", 0)))
attempt("listen listener", lambda: listener.listen(1))
attempt("dup listener", lambda: os.dup(listener.fileno()))
attempt("dup2 listener", lambda: os.dup2(listener.fileno(), 200))
attempt("fcntl dupfd listener", lambda: fcntl.fcntl(listener.fileno(), fcntl.F_DUPFD, 200))
attempt("attach program", lambda: other.setsockopt(socket.SOL_SOCKET, 51, b"\0" * 16))
attempt("detach program", lambda: listener.setsockopt(socket.SOL_SOCKET, 68, 0))
attempt("shutdown other", lambda: other.shutdown(socket.SHUT_RDWR))
attempt("dup other", lambda: os.close(os.dup(other.fileno())))
attempt("reuseaddr", lambda: other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1))
attempt("fcntl getfl listener", lambda: fcntl.fcntl(listener.fileno(), fcntl.F_GETFL))
client = socket.create_connection(listener.getsockname())
accepted, _ = listener.accept()
attempt("shutdown a connection", lambda: accepted.shutdown(socket.SHUT_WR))
asyncio.run(asyncio.sleep(0))
thread = threading.Thread(target=lambda: None)
thread.start()
thread.join()
results["child process"] = subprocess.run(["true"]).returncode
fd = listener.fileno()
retire_listener(listener)
results["retired number"] = os.readlink(f"/proc/self/fd/{fd}")
print(json.dumps(results))
"""


def test_the_lock_down_refuses_what_touches_the_listeners_and_nothing_else() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True)
    results = json.loads(done.stdout)
    assert results.pop("locked") is True
    refused = {name for name, result in results.items() if result == "EPERM"}
    assert refused == {
        "shutdown listener",
        "connect listener",
        "listen listener",
        "dup listener",
        "dup2 listener",
        "fcntl dupfd listener",
        "attach program",
        "detach program",
    }, results
    assert results["shutdown other"] == results["dup other"] == results["reuseaddr"] == "ok"
    assert results["shutdown a connection"] == "ok" and results["child process"] == 0
    assert results["retired number"] == "/dev/null"


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_every_jump_of_the_program_lands_inside_it(machine: str) -> None:
    program = lockdown_program([7, 8, 9], machine)
    for at, instruction in enumerate(program):
        if instruction.code & 0x07 == 0x05:  # BPF_JMP
            assert at + 1 + max(instruction.jt, instruction.jf) < len(program)
    assert program[-1].code == 0x06 and program[-2].code == 0x06  # ends in 'allow' and 'deny'
