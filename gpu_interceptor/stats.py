"""Read the counters libsair_intercept.so keeps in its shared-memory file.

The shim maps the file named by ``SAIR_GPU_STATS_PATH`` (``{pid}`` in it becomes the
process id) and keeps ``struct sair_intercept_stats`` (gpu_interceptor/include/
sair_intercept.h) at offset 0: :data:`FIELDS` as little-endian uint64 values, in that order.
Each value is updated atomically on its own; a read sees each field whole but the fields
of one read may be a few launches apart.

Pure standard library, so a worker can read it without any dependency::

    from gpu_interceptor.stats import read_stats
    stats = read_stats("/dev/shm/sair-gpu-1234.stats")
    print(stats["tokens_used"], MODES[stats["mode"]])
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

MAGIC = 0x3155504752494153  # "SAIRGPU1" read as a little-endian uint64 (SAIR_STATS_MAGIC)
VERSION = 1  # SAIR_STATS_VERSION

# The order of SAIR_STATS_FIELDS in sair_intercept.h (tests compare the two).
FIELDS: tuple[str, ...] = (
    "magic",
    "version",
    "pid",
    "mode",
    "tokens_used",
    "wait_ns",
    "waits",
    "launches_kernel",
    "launches_kernel_ptsz",
    "launches_kernel_ex",
    "launches_kernel_ex_ptsz",
    "launches_cooperative",
    "launches_cooperative_ptsz",
    "launches_graph",
    "launches_graph_ptsz",
    "graph_kernel_nodes",
    "graph_execs_tracked",
    "graph_launches_untracked",
    "refills",
    "redis_calls",
    "redis_errors",
    "tokens_granted",
    "hold_tokens",
    "local_tokens",
    "rate_milli",
    "batch",
    "wrapped_proc_address",
    "wrapped_dlsym",
    "recursion_avoided",
    "missing_real",
)

# enum sair_mode
MODES: dict[int, str] = {
    0: "starting",
    1: "throttled",
    2: "unconfigured",
    3: "open",
    4: "hold",
    5: "disabled",
}

# Gauges stored as two's complement int64 in a uint64 slot.
SIGNED_FIELDS: frozenset[str] = frozenset({"local_tokens"})

_LAYOUT = struct.Struct("<" + "Q" * len(FIELDS))
SIZE = _LAYOUT.size


class StatsFileError(ValueError):
    """The file is not (yet) a SAIR interceptor stats page."""


def parse_stats(data: bytes) -> dict[str, int]:
    """Decode one stats page (at least :data:`SIZE` bytes) into ``{field: value}``."""
    if len(data) < SIZE:
        raise StatsFileError(f"stats page is {len(data)} bytes, expected at least {SIZE}")
    values = _LAYOUT.unpack_from(data, 0)
    stats = dict(zip(FIELDS, values, strict=True))
    if stats["magic"] != MAGIC:
        raise StatsFileError("no SAIR stats magic: the shim has not initialised this file")
    if stats["version"] != VERSION:
        raise StatsFileError(f"stats layout version {stats['version']}, reader knows {VERSION}")
    for name in SIGNED_FIELDS:
        if stats[name] >= 1 << 63:
            stats[name] -= 1 << 64
    return stats


def read_stats(path: str | os.PathLike[str]) -> dict[str, int]:
    """Read the shim's counters from its stats file (``SAIR_GPU_STATS_PATH``).

    Raises FileNotFoundError when there is no such file and :class:`StatsFileError` when it
    is not an initialised stats page of a known version.
    """
    with Path(path).open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < SIZE:
            raise StatsFileError(f"{path}: {size} bytes, expected at least {SIZE}")
        with mmap.mmap(f.fileno(), SIZE, access=mmap.ACCESS_READ) as page:
            return parse_stats(bytes(page[:SIZE]))


def mode_name(stats: dict[str, int]) -> str:
    """The shim's current mode as a word (``throttled``, ``open``, ``hold``, ...)."""
    return MODES.get(stats["mode"], f"unknown({stats['mode']})")
