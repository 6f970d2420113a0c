"""The router's tables: the partition of a key is the one the router names, not the event's.

Faust puts a table write on the changelog partition of the event being processed (its
``current_event``). The router writes outside that rule twice: it handles its inputs in
batches that mix partitions (``take_events``), and its clock changes records with no event at
all (an expiry, a reassignment). Both know the right partition, the task's (every input topic
is keyed by task id with one partition count), so they say it: :func:`at_partition` sets it
for the writes and reads inside, and the table and stores here use it, falling back to the
current event's partition like Faust.

* :class:`KeyedTable`: a Faust table whose changelog partition is that partition.
* :class:`OwnedMemoryStore` (``memory://``): Faust's memory store prunes, after each
  rebalance's recovery, the keys of partitions this worker lost, but only knows the partition
  of keys it restored from the changelog; this one records the partition of every write, so
  a worker keeps only what it owns (issue 14, finding 6).
* :class:`KeyedRocksStore` (``rocksdb://``): Faust's RocksDB store (one database per
  partition, on disk: memory stays bounded however long the ledger is kept) reading and
  writing the named partition's database.

:func:`register` makes these the stores behind ``memory://`` and ``rocksdb://`` in this
process (a scheme of its own does not survive Faust's URL handling of table stores).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import faust
from faust.stores import STORES
from faust.stores.memory import Store as MemoryStore
from faust.stores.rocksdb import Store as RocksStore
from faust.streams import current_event

_PARTITION: ContextVar[int | None] = ContextVar("stormline_router_partition", default=None)


@contextlib.contextmanager
def at_partition(partition: int) -> Iterator[None]:
    """Table reads and writes inside use ``partition`` (the task's)."""
    token = _PARTITION.set(partition)
    try:
        yield
    finally:
        _PARTITION.reset(token)


def partition_now() -> int | None:
    """The partition named by :func:`at_partition`, else the current event's, else None."""
    p = _PARTITION.get()
    if p is not None:
        return p
    event = current_event()
    return None if event is None else int(event.message.partition)


class KeyedTable(faust.Table):
    """A table whose changelog partition is :func:`partition_now`, and which keeps the
    future of each changelog write (:attr:`unacked`) until the router takes them: each
    resolves when the broker acknowledged the write (Faust's producer flush may return
    before that, after a tenth of a second without progress)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unacked: list[Any] = []

    def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
        fut = super().send_changelog(*args, **kwargs)
        self.unacked.append(fut)
        return fut

    def take_unacked(self) -> list[Any]:
        out, self.unacked = self.unacked, []
        return out

    def partition_for_key(self, key: Any) -> int | None:
        p = partition_now()
        if p is None:
            raise RuntimeError(
                f"table {self.name}: a write outside stream iteration must name its partition "
                "(streams.stores.at_partition)"
            )
        return p


class OwnedMemoryStore(MemoryStore):
    def __setitem__(self, key: Any, value: Any) -> None:
        p = partition_now()
        if p is not None:
            self._key_partition[key] = p
        self.data[key] = value

    def __delitem__(self, key: Any) -> None:
        del self.data[key]
        self._key_partition.pop(key, None)


class KeyedRocksStore(RocksStore):
    def _set(self, key: bytes, value: bytes | None) -> None:
        p = partition_now()
        if p is None:
            raise RuntimeError("a RocksDB table write must name its partition")
        self._key_index[key] = p
        self._db_for_partition(p).put(key, value)

    def _get(self, key: bytes) -> bytes | None:
        p = partition_now()
        if p is None:
            return super()._get(key)
        value = self._db_for_partition(p).get(key)
        if value is not None:
            self._key_index[key] = p
        return value

    def _contains(self, key: bytes) -> bool:
        p = partition_now()
        if p is None:
            return super()._contains(key)
        return self._db_for_partition(p).get(key) is not None

    def _del(self, key: bytes) -> None:
        p = partition_now()
        if p is None:
            super()._del(key)
        else:
            self._db_for_partition(p).delete(key)
            self._key_index.pop(key, None)


def register() -> None:
    """Make these the stores behind ``memory://`` and ``rocksdb://`` in this process."""
    STORES.aliases["memory"] = f"{__name__}:OwnedMemoryStore"
    STORES.aliases["rocksdb"] = f"{__name__}:KeyedRocksStore"
