"""How evenly IP hash spreads address sets over 2 to 64 workers, against what a random assignment would give.

    python bench/balance.py [--trials N]

For each address set (sequential blocks: a /24, the tests' 127.0.0.2-25, 64 and 250
sequential addresses; random IPv4 addresses; random IPv6 addresses, one per /64,
hashed with ``ipv6_prefix=64``) and each worker count, it assigns every address with
``IPHashBalancer`` (the function the kernel's program computes too) and prints:

- ``chi2/df``: Pearson's chi-square of the per-worker counts against an even split,
  over its degrees of freedom. A random assignment gives 1 on average; the column
  ``random`` is the same statistic's 99th percentile over ``--trials`` random
  assignments of as many addresses (a set above it is spread worse than 99% of
  random ones).
- ``max/avg``: the busiest worker against the average, and the same 99th percentile.

Sequential sets are where a weak mix shows (neighbouring keys landing together).
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sticky_server.balancer import ClientInfo, IPHashBalancer, WorkerSet

WORKER_COUNTS = (2, 3, 4, 8, 16, 32, 64)


def address_sets(rng: random.Random) -> dict[str, tuple[list[str], int]]:
    """name -> (addresses, ipv6 prefix to hash them with)."""
    block = [str(ipaddress.IPv4Address("10.20.30.0") + n) for n in range(256)]
    return {
        "10.20.30.0/24 (256)": (block, 128),
        "127.0.0.2-25 (24)": ([f"127.0.0.{n}" for n in range(2, 26)], 128),
        "sequential 64": (block[1:65], 128),
        "sequential 250": (block[1:251], 128),
        "random IPv4 (1000)": ([str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(1000)], 128),
        "random IPv6 /64 (1000)": (
            [str(ipaddress.IPv6Address((0x2001_0DB8 << 96) | (rng.getrandbits(32) << 64) | 1)) for _ in range(1000)],
            64,
        ),
        "sequential IPv6 /64 (256)": (
            [str(ipaddress.IPv6Address((0x2001_0DB8_0000_0000 + n) << 64 | 0x1234)) for n in range(256)],
            64,
        ),
    }


def spread(counts: Sequence[int]) -> tuple[float, float]:
    """(chi-square over its degrees of freedom, busiest over average) of per-worker counts."""
    workers = len(counts)
    expected = sum(counts) / workers
    chi2 = sum((count - expected) ** 2 / expected for count in counts)
    return chi2 / (workers - 1), max(counts) / expected


def percentile99(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.99)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2000, help="random assignments per row (default 2000)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    print(f"{'address set':<28} {'workers':>7} {'chi2/df':>8} {'random 99%':>10} {'max/avg':>8} {'random 99%':>10}")
    worse = []
    for name, (addresses, ipv6_prefix) in address_sets(rng).items():
        balancer = IPHashBalancer(ipv6_prefix=ipv6_prefix)
        for workers in WORKER_COUNTS:
            everyone = WorkerSet(workers, tuple(range(workers)))
            counts = [0] * workers
            for address in addresses:
                counts[balancer.pick(ClientInfo(address, 1), everyone)] += 1
            chi2, peak = spread(counts)
            random_spreads = []
            for _ in range(args.trials):
                random_counts = [0] * workers
                for _ in addresses:
                    random_counts[rng.randrange(workers)] += 1
                random_spreads.append(spread(random_counts))
            chi2_99 = percentile99([entry[0] for entry in random_spreads])
            peak_99 = percentile99([entry[1] for entry in random_spreads])
            flag = " <- worse than 99% of random" if chi2 > chi2_99 else ""
            if flag:
                worse.append(f"{name}, {workers} workers")
            print(f"{name:<28} {workers:>7} {chi2:8.2f} {chi2_99:10.2f} {peak:8.2f} {peak_99:10.2f}{flag}")
    print(f"\n{len(worse)} of {len(WORKER_COUNTS) * 7} rows spread worse than 99% of random assignments")
    for row in worse:
        print(f"  {row}")


if __name__ == "__main__":
    main()
