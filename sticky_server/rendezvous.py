"""The IP-hash function, in 32-bit arithmetic so that the kernel computes it too.

Rendezvous (highest-random-weight) hashing: a client's address becomes a 32-bit
key; every slot has a seed; the client's score for a slot is ``mix32(key ^ seed)``
and it goes to the alive slot with the highest score (the lowest slot on a tie).
Removing a slot moves exactly the clients whose best slot it was, each to its
second best; no other client moves.

Everything here is 32-bit xor, and, shift and multiply on unsigned words, the
operations a classic BPF program has, so the master's ``IPHashBalancer`` and the
program the kernel runs for the kernel path (``steering.bpf``) are the same
function, written twice; ``tests/test_steering.py`` checks that they agree on real
connections.

- An IPv4 address (or an IPv4-mapped IPv6 one, which is how an IPv4 client of a
  dual-stack listener looks to Python) keys as ``mix32((address & mask) ^ IPV4_SALT)``.
- An IPv6 address keys as ``mix32`` folded over its four big-endian 32-bit words,
  each masked to the prefix, starting from ``IPV6_SALT``.
- ``mix32`` is MurmurHash3's 32-bit finaliser: bijective, every input bit
  reaching every output bit.
"""

from __future__ import annotations

import hashlib
import socket

__all__ = [
    "IPV4_SALT",
    "IPV6_SALT",
    "MASK32",
    "address_key",
    "best_slot",
    "ipv4_mask",
    "ipv6_masks",
    "mix32",
    "slot_seed",
]

MASK32 = 0xFFFFFFFF
IPV4_SALT = 0x3C6EF372
IPV6_SALT = 0xA54FF53A
MIX_MULTIPLIER_1 = 0x85EBCA6B
MIX_MULTIPLIER_2 = 0xC2B2AE35
_GOLDEN = 0x9E3779B9
_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def mix32(value: int) -> int:
    """MurmurHash3's finaliser on a 32-bit word."""
    value ^= value >> 16
    value = (value * MIX_MULTIPLIER_1) & MASK32
    value ^= value >> 13
    value = (value * MIX_MULTIPLIER_2) & MASK32
    return value ^ (value >> 16)


def slot_seed(slot: int) -> int:
    """The seed of ``slot``'s scores."""
    return mix32(((slot + 1) * _GOLDEN) & MASK32)


def ipv4_mask(prefix: int) -> int:
    """The 32-bit netmask of an IPv4 prefix length (0 to 32)."""
    return (MASK32 << (32 - prefix)) & MASK32


def ipv6_masks(prefix: int) -> tuple[int, int, int, int]:
    """The netmask of an IPv6 prefix length (0 to 128), as four big-endian 32-bit words."""
    mask = ((1 << 128) - 1) ^ ((1 << (128 - prefix)) - 1)
    return (mask >> 96, (mask >> 64) & MASK32, (mask >> 32) & MASK32, mask & MASK32)


def _ipv6_key(packed: bytes, masks: tuple[int, int, int, int]) -> int:
    key = IPV6_SALT
    for index, mask in enumerate(masks):
        key = mix32(key ^ (int.from_bytes(packed[index * 4 : index * 4 + 4], "big") & mask))
    return key


def address_key(host: str, ipv4_prefix: int = 32, ipv6_prefix: int = 128) -> int:
    """The 32-bit key of a client address; an IPv4-mapped IPv6 address keys like the IPv4 address.

    Only the first ``ipv4_prefix`` / ``ipv6_prefix`` bits count, so every address of
    one network keys alike. Text that is not an IP address (a Unix socket path,
    '') is hashed as bytes.
    """
    try:
        packed = socket.inet_pton(socket.AF_INET, host)
    except OSError:
        try:
            packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
        except OSError:
            return int.from_bytes(hashlib.blake2b(host.encode(), digest_size=4).digest(), "big")
        if not packed.startswith(_V4_MAPPED_PREFIX):
            return _ipv6_key(packed, ipv6_masks(ipv6_prefix))
        packed = packed[12:]
    return mix32((int.from_bytes(packed, "big") & ipv4_mask(ipv4_prefix)) ^ IPV4_SALT)


def best_slot(key: int, alive: tuple[int, ...], seeds: list[int]) -> int:
    """The alive slot with the highest score for ``key``; ``seeds[slot]`` is ``slot_seed(slot)``."""
    best, best_score = alive[0], -1
    for slot in alive:
        # mix32(key ^ seeds[slot]), inlined: this loop is the cost of a cache miss.
        score = key ^ seeds[slot]
        score ^= score >> 16
        score = (score * MIX_MULTIPLIER_1) & MASK32
        score ^= score >> 13
        score = (score * MIX_MULTIPLIER_2) & MASK32
        score ^= score >> 16
        if score > best_score:
            best, best_score = slot, score
    return best
