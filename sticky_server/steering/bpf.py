"""The classic BPF program that steers a connection to its slot's listener, and attaching it.

``SO_ATTACH_REUSEPORT_CBPF`` on one socket of a ``SO_REUSEPORT`` group makes the
kernel run a classic BPF program on each new connection's first packet (the SYN);
what the program returns is the index of the socket that gets the connection, in
the order the group's sockets started listening. It needs no privileges.

The program computes ``rendezvous``'s function over the alive slots: it reads the
IP version and the source address through ``SKF_NET_OFF`` (the network header,
wherever the packet data starts), keys it as ``rendezvous.address_key`` does, and
unrolls the highest-score loop over the alive slots (about 18 instructions each;
classic BPF has no loops). An IPv4 client of a dual-stack IPv6 listener sends an
IPv4 packet, so it keys as IPv4, as the mapped address does in Python.

Scratch memory: ``M[0]`` the key, ``M[1]`` the best score so far, ``M[2]`` its slot.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from ..rendezvous import IPV4_SALT, IPV6_SALT, MIX_MULTIPLIER_1, MIX_MULTIPLIER_2, ipv4_mask, ipv6_masks, slot_seed

__all__ = ["MAX_INSTRUCTIONS", "SO_ATTACH_REUSEPORT_CBPF", "Instruction", "attach", "rendezvous_program"]

SO_ATTACH_REUSEPORT_CBPF = 51  # asm-generic/socket.h (the same on every Linux architecture but alpha/mips/parisc/sparc)
MAX_INSTRUCTIONS = 4096  # BPF_MAXINSNS
_SKF_NET_OFF = -0x100000

# Opcode parts (linux/bpf_common.h).
_LD, _LDX, _ST, _ALU, _JMP, _RET, _MISC = 0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07
_W, _B = 0x00, 0x10
_IMM, _ABS, _MEM = 0x00, 0x20, 0x60
_MUL, _AND, _RSH, _XOR = 0x20, 0x50, 0x70, 0xA0
_JA, _JEQ, _JGT = 0x00, 0x10, 0x20
_K, _X = 0x00, 0x08
_RET_A = 0x10
_TAX = 0x00

_KEY, _BEST_SCORE, _BEST_SLOT = 0, 1, 2
# What the program returns for a packet that is neither IPv4 nor IPv6: past the group's
# end, which makes the kernel fall back to its own hash (never happens for TCP/IP).
_UNKNOWN = 0xFFFFFFFF


class Instruction(NamedTuple):
    """One ``struct sock_filter``."""

    code: int
    jt: int = 0
    jf: int = 0
    k: int = 0


def _net(offset: int) -> int:
    return (_SKF_NET_OFF + offset) & 0xFFFFFFFF


def _mix32() -> list[Instruction]:
    """A = mix32(A); X is clobbered."""
    code: list[Instruction] = []
    for shift, multiplier in ((16, MIX_MULTIPLIER_1), (13, MIX_MULTIPLIER_2), (16, None)):
        code += [
            Instruction(_MISC | _TAX),
            Instruction(_ALU | _RSH | _K, k=shift),
            Instruction(_ALU | _XOR | _X),
        ]
        if multiplier is not None:
            code.append(Instruction(_ALU | _MUL | _K, k=multiplier))
    return code


def _ipv4_key(prefix: int) -> list[Instruction]:
    return [
        Instruction(_LD | _W | _ABS, k=_net(12)),
        Instruction(_ALU | _AND | _K, k=ipv4_mask(prefix)),
        Instruction(_ALU | _XOR | _K, k=IPV4_SALT),
        *_mix32(),
        Instruction(_ST, k=_KEY),
    ]


def _ipv6_key(prefix: int) -> list[Instruction]:
    code: list[Instruction] = []
    for index, mask in enumerate(ipv6_masks(prefix)):
        code += [
            Instruction(_LD | _W | _ABS, k=_net(8 + 4 * index)),
            Instruction(_ALU | _AND | _K, k=mask),
        ]
        if index == 0:
            code.append(Instruction(_ALU | _XOR | _K, k=IPV6_SALT))
        else:
            code += [Instruction(_LDX | _W | _MEM, k=_KEY), Instruction(_ALU | _XOR | _X)]
        code += [*_mix32(), Instruction(_ST, k=_KEY)]
    return code


def _best_of(alive: Sequence[int], index_of: Mapping[int, int]) -> list[Instruction]:
    code: list[Instruction] = []
    for position, slot in enumerate(alive):
        code += [
            Instruction(_LD | _W | _MEM, k=_KEY),
            Instruction(_ALU | _XOR | _K, k=slot_seed(slot)),
            *_mix32(),
        ]
        if position:  # strictly higher wins, so a tie keeps the lower slot, as in Python
            code += [Instruction(_LDX | _W | _MEM, k=_BEST_SCORE), Instruction(_JMP | _JGT | _X, jt=0, jf=3)]
        index = index_of.get(slot, slot)
        code += [Instruction(_ST, k=_BEST_SCORE), Instruction(_LD | _W | _IMM, k=index), Instruction(_ST, k=_BEST_SLOT)]
    return [*code, Instruction(_LD | _W | _MEM, k=_BEST_SLOT), Instruction(_RET | _RET_A)]


def rendezvous_program(
    alive: Sequence[int], ipv4_prefix: int = 32, ipv6_prefix: int = 128, index_of: Mapping[int, int] | None = None
) -> list[Instruction]:
    """The program choosing, among ``alive`` (ascending slots), what ``rendezvous.best_slot`` does.

    It returns the chosen slot's index in the group: ``index_of[slot]``, the slot
    itself where the map says nothing (the group in slot order).

    Raises ValueError if ``alive`` is empty or the program would be longer than the
    kernel takes (``MAX_INSTRUCTIONS``: about 220 slots).
    """
    if not alive:
        raise ValueError("a steering program needs at least one alive slot")
    ipv6 = [*_ipv6_key(ipv6_prefix), Instruction(_JMP | _JA, k=0)]  # the jump's length is filled in below
    ipv4 = _ipv4_key(ipv4_prefix)
    ipv6[-1] = Instruction(_JMP | _JA, k=len(ipv4))
    # Laid out as: this head, the IPv6 key (ending in a jump over the IPv4 key), the IPv4 key, the scores.
    head = [
        Instruction(_LD | _B | _ABS, k=_net(0)),
        Instruction(_ALU | _RSH | _K, k=4),
        Instruction(_JMP | _JEQ | _K, jt=2 + len(ipv6), jf=0, k=4),  # IPv4: over the rest of the head and IPv6
        Instruction(_JMP | _JEQ | _K, jt=1, jf=0, k=6),
        Instruction(_RET | _K, k=_UNKNOWN),
    ]
    program = [*head, *ipv6, *ipv4, *_best_of(alive, index_of or {})]
    if len(program) > MAX_INSTRUCTIONS:
        raise ValueError(
            f"a steering program for {len(alive)} slots would be {len(program)} instructions, "
            f"over the kernel's {MAX_INSTRUCTIONS}"
        )
    return program


def attach(listener: socket.socket, program: Sequence[Instruction]) -> None:
    """Attach ``program`` to ``listener``'s ``SO_REUSEPORT`` group (replacing its program, atomically).

    Raises OSError with the kernel's reason if it refuses.
    """
    filters = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *instruction) for instruction in program))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(filters))
    listener.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
