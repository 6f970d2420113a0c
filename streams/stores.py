"""An in-memory table store that forgets what a worker no longer owns (issue 14, finding 6).

Faust's memory store prunes, after each rebalance's recovery, the keys of partitions this
worker lost, but it only knows the partition of keys it *restored from the changelog*: keys
written here while processing were kept forever after their partition moved to another
worker, and the timers kept finding them due. This store also records the partition of every
key set during stream iteration (the partition of the event being processed, which is the
changelog partition Faust writes it to), so the pruning covers every key.

:func:`register` makes it the store behind ``memory://`` in this process (a scheme of its
own does not survive Faust's URL handling of table stores).
"""

from __future__ import annotations

from typing import Any

from faust.stores import STORES
from faust.stores.memory import Store
from faust.streams import current_event

URL = "memory://"


class OwnedMemoryStore(Store):
    def __setitem__(self, key: Any, value: Any) -> None:
        event = current_event()
        if event is not None:
            self._key_partition[key] = event.message.partition
        self.data[key] = value

    def __delitem__(self, key: Any) -> None:
        del self.data[key]
        self._key_partition.pop(key, None)


def register() -> str:
    """Make this the store behind ``memory://``; returns that URL."""
    STORES.aliases["memory"] = f"{__name__}:OwnedMemoryStore"
    return URL
