"""A kernel-path worker's lock-down: what it may not do to the listeners it shares with the master.

On the kernel path a worker holds its slot's listener, the very socket the master
holds, a member of the port's ``SO_REUSEPORT`` group. Through it, code in the worker
could attach its own steering program to the group (every client of every slot to
one worker), detach the master's (no more stickiness), or shut the listener down
(the group's order changes under the master's program). Before any application code
of the worker runs, it installs a seccomp filter that answers ``EPERM`` to:

- ``setsockopt(SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF | SO_ATTACH_REUSEPORT_EBPF |
  SO_DETACH_REUSEPORT_BPF)`` on any socket (a worker never steers);
- ``shutdown``, ``connect`` (``AF_UNSPEC`` disconnects a listener) and ``listen`` on
  its listeners' descriptors, and copying them (``dup``, ``dup2``/``dup3``,
  ``fcntl(F_DUPFD*)``), so that no other number can name them;
- ``io_uring_setup``, whose operations would go around the filter, and any system
  call of another ABI (32-bit, x32), which the filter could not read.

``PR_SET_NO_NEW_PRIVS`` comes with it (the kernel requires it of an unprivileged
filter): programs the worker runs cannot gain privileges through setuid bits. The
filter is inherited by the worker's children and cannot be removed. Linux on x86-64
and arm64 only; elsewhere (and where the kernel has no seccomp) the master's own
checks remain (master rule 7: a listener that stops listening is replaced).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import socket
import struct
import sys
from collections.abc import Sequence

from ..steering.bpf import Instruction

__all__ = ["lock_down_listeners", "lockdown_program", "retire_listener"]

logger = logging.getLogger("sticky_server.worker")

# The seccomp system call itself, by architecture (it takes flags; prctl does not).
_SECCOMP_CALL = {"x86_64": 317, "aarch64": 277}
_SECCOMP_SET_MODE_FILTER = 1
# No speculative-store-bypass mitigation forced on the worker for having a filter (older kernels
# did that by default, at a cost to every process with one); the filter is about the listeners.
_SECCOMP_FILTER_FLAG_SPEC_ALLOW = 1 << 2
# linux/audit.h, and each architecture's system call numbers (unistd.h).
_ARCHES = {
    "x86_64": (
        0xC000003E,  # AUDIT_ARCH_X86_64
        {
            "setsockopt": 54,
            "shutdown": 48,
            "connect": 42,
            "listen": 50,
            "dup": 32,
            "dup2": 33,
            "dup3": 292,
            "fcntl": 72,
            "io_uring_setup": 425,
        },
    ),
    "aarch64": (
        0xC00000B7,  # AUDIT_ARCH_AARCH64
        {
            "setsockopt": 208,
            "shutdown": 210,
            "connect": 203,
            "listen": 201,
            "dup": 23,
            "dup3": 24,
            "fcntl": 25,
            "io_uring_setup": 425,
        },
    ),
}
_X32_BIT = 0x40000000
_SOL_SOCKET = 1
_STEERING_OPTIONS = (51, 52, 68)  # SO_ATTACH_REUSEPORT_CBPF, SO_ATTACH_REUSEPORT_EBPF, SO_DETACH_REUSEPORT_BPF
_F_DUPFD, _F_DUPFD_CLOEXEC = 0, 1030
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_RET_ALLOW = 0x7FFF0000
_RET_EPERM = 0x00050000 | errno.EPERM  # SECCOMP_RET_ERRNO

# struct seccomp_data: nr, arch, instruction_pointer, args[6] (the low word of each first on little-endian).
_NR, _ARCH = 0, 4


def _arg(index: int) -> int:
    return 16 + 8 * index


_LD_ABS, _JEQ, _JGE, _RET = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K

# A step of the program before assembly: (code, k, where to go if true, if false); a label names a place.
_Step = tuple[int, int, str | None, str | None]


def _assemble(steps: list[_Step | str]) -> list[Instruction]:
    """Steps and labels into instructions, each jump's label turned into its distance."""
    places: dict[str, int] = {}
    instructions: list[_Step] = []
    for step in steps:
        if isinstance(step, str):
            places[step] = len(instructions)
        else:
            instructions.append(step)

    def distance(label: str | None, at: int) -> int:
        return 0 if label is None else places[label] - at - 1

    return [
        Instruction(code, distance(true, at), distance(false, at), k)
        for at, (code, k, true, false) in enumerate(instructions)
    ]


def lockdown_program(listener_fds: Sequence[int], machine: str | None = None) -> list[Instruction]:
    """The seccomp filter (classic BPF) for a worker holding ``listener_fds`` (module docstring)."""
    arch, numbers = _ARCHES[machine or platform.machine()]
    fd_calls = [numbers[name] for name in ("shutdown", "connect", "listen", "dup", "dup2", "dup3") if name in numbers]
    steps: list[_Step | str] = [
        (_LD_ABS, _ARCH, None, None),
        (_JEQ, arch, None, "deny"),
        (_LD_ABS, _NR, None, None),
        (_JGE, _X32_BIT, "deny", None),
        (_JEQ, numbers["setsockopt"], "setsockopt", None),
        (_JEQ, numbers["fcntl"], "fcntl", None),
        (_JEQ, numbers["io_uring_setup"], "deny", None),
        *((_JEQ, number, "fd", None) for number in fd_calls),
        (_RET, _RET_ALLOW, None, None),
        "setsockopt",
        (_LD_ABS, _arg(1), None, None),
        (_JEQ, _SOL_SOCKET, None, "allow"),
        (_LD_ABS, _arg(2), None, None),
        *((_JEQ, option, "deny", None) for option in _STEERING_OPTIONS),
        (_RET, _RET_ALLOW, None, None),
        "fcntl",
        (_LD_ABS, _arg(1), None, None),
        (_JEQ, _F_DUPFD, "fd", None),
        (_JEQ, _F_DUPFD_CLOEXEC, "fd", "allow"),
        "fd",
        (_LD_ABS, _arg(0), None, None),
        *((_JEQ, fd, "deny", None) for fd in listener_fds),
        "allow",
        (_RET, _RET_ALLOW, None, None),
        "deny",
        (_RET, _RET_EPERM, None, None),
    ]
    return _assemble(steps)


def lock_down_listeners(listener_fds: Sequence[int]) -> bool:
    """Install the filter in this process; False (and a DEBUG line) where it cannot be."""
    if not listener_fds:
        return False
    if not sys.platform.startswith("linux") or platform.machine() not in _ARCHES:
        logger.debug("no seccomp lock-down of the listeners here (%s %s)", sys.platform, platform.machine())
        return False
    program = lockdown_program(listener_fds)
    filters = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *instruction) for instruction in program))
    fprog = ctypes.create_string_buffer(struct.pack("@HP", len(program), ctypes.addressof(filters)))
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    syscall = libc.syscall
    syscall.argtypes = [ctypes.c_long, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    syscall.restype = ctypes.c_long
    number = _SECCOMP_CALL[platform.machine()]
    flags = _SECCOMP_FILTER_FLAG_SPEC_ALLOW
    if prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or (
        syscall(number, _SECCOMP_SET_MODE_FILTER, flags, ctypes.addressof(fprog)) != 0
        # a kernel before 4.17 knows no flags: the filter alone, as prctl installs it
        and prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0
    ):
        error = ctypes.get_errno()
        logger.warning(
            "could not lock down this worker's listeners with seccomp (%s); the master still checks them",
            errno.errorcode.get(error, error),
        )
        return False
    return True


def retire_listener(listener: socket.socket) -> None:
    """Close this worker's copy of a listener, leaving ``/dev/null`` at its number until the worker exits.

    The filter refuses ``shutdown`` and ``dup`` on that number for good: were it free,
    the next connection would get it, and its own ``shutdown`` would fail.
    """
    fd = listener.detach()
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.dup2(devnull, fd, inheritable=False)
    finally:
        os.close(devnull)
