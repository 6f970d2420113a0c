"""Which partition a key lands on: the one murmur2 (aiokafka's, the Java client's hash).

Stormline's producers use librdkafka's ``murmur2_random`` partitioner, the Java client's
and Faust's (aiokafka's) choice, so a key lands on the same partition whichever client
produced it. A plain librdkafka client defaults to CRC32 (``consistent_random``) instead.
"""

from __future__ import annotations

import zlib
from typing import cast

from aiokafka.partitioner import murmur2

# The partitioner of every Stormline producer (see the module docstring).
PARTITIONER = "murmur2_random"

__all__ = ["PARTITIONER", "murmur2", "partition_for"]


def partition_for(key: str | bytes, partitions: int, partitioner: str = PARTITIONER) -> int:
    """The partition a librdkafka producer with ``partitioner`` sends a non-empty key to."""
    data = key.encode() if isinstance(key, str) else key
    if partitioner in ("consistent", "consistent_random"):
        return zlib.crc32(data) % partitions
    if partitioner in ("murmur2", "murmur2_random"):
        # aiokafka's murmur2 is unannotated (Any); it returns the 32-bit hash as an int.
        return (cast(int, murmur2(data)) & 0x7FFFFFFF) % partitions
    raise ValueError(f"unsupported partitioner {partitioner!r}")
