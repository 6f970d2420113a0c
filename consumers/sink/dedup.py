"""One row per event id: the sink's write-time de-duplication (issue 15, finding 5).

An event that can be produced again (a re-sent trajectory, a re-scored reward, a router
outcome after a restart) comes back with the same ``event_id`` at a *later* offset, and with
the same Kafka key, so in the same partition. Offsets cannot catch it; this can.

The rule, the same for every writer: of the copies of one event id in a table, the one at
the lowest offset is kept. A row is dropped when its table already holds its event id at a
lower offset of its (topic, partition), or in another (topic, partition), or when a lower
offset of the same batch carries it. Every writer of a partition knows every copy below its
own rows (those below its start offset were written before they were committed; the rest it
read itself), so two writers of the same offsets (a zombie and the new owner) keep the same
rows and their parts differ only in where they end.

:class:`SeenIds` is a table's index: the low 64 bits of every stored event id (a UUID) in a
sorted numpy array (8 bytes an event), loaded from the store once per assignment, plus the
ids written since. A hit is only a candidate: it is confirmed by an exact query, so a hash
collision never drops an event.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

# The low 64 bits of a UUID's canonical text, in SQL (the same on chDB and a server) ...
HASH_SQL = (
    "reinterpretAsUInt64(reverse(unhex(concat(substring(event_id, 20, 4), "
    "substring(event_id, 25, 12)))))"
)
_MERGE_AT = 50_000  # ids kept in a set before they join the sorted array


def id_hash(event_id: str) -> int | None:
    """... and in Python: the last two groups of ``xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx``.
    None for an id that is not a UUID's text (rows written by other tools): always a
    candidate, checked exactly."""
    if len(event_id) != 36 or event_id[23] != "-":
        return None
    try:
        return int(event_id[19:23] + event_id[24:36], 16)
    except ValueError:
        return None


Query = Callable[[str], Sequence[tuple[Any, ...]]]


class SeenIds:
    """The event ids one table holds (as 64-bit hashes: candidates, not proof)."""

    def __init__(self, stored: np.ndarray) -> None:
        self._sorted = np.unique(stored.astype(np.uint64, copy=False))
        self._recent: set[int] = set()

    @classmethod
    def load(cls, table: str, query_arrow: Callable[[str], pa.Table]) -> SeenIds:
        got = query_arrow(f"SELECT DISTINCT {HASH_SQL} AS h FROM {table}")
        if got.num_rows == 0:
            return cls(np.empty(0, np.uint64))
        return cls(got.column(0).to_numpy())

    def __len__(self) -> int:
        return len(self._sorted) + len(self._recent)

    def candidates(self, hashes: Sequence[int | None]) -> list[bool]:
        """Whether each hash may be stored already (None: it may)."""
        if not hashes:
            return []
        arr = np.fromiter((h or 0 for h in hashes), dtype=np.uint64, count=len(hashes))
        at = np.searchsorted(self._sorted, arr)
        hit = at < len(self._sorted)
        hit[hit] = self._sorted[at[hit]] == arr[hit]
        return [v is None or bool(h) or v in self._recent for h, v in zip(hit, hashes, strict=True)]

    def add(self, hashes: Sequence[int | None]) -> None:
        self._recent.update(h for h in hashes if h is not None)
        if len(self._recent) >= _MERGE_AT:
            more = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
            self._sorted = np.union1d(self._sorted, more)
            self._recent.clear()


def stored_copies(
    table: str, event_ids: Sequence[str], query: Query
) -> dict[str, list[tuple[str, int, int]]]:
    """Exact: event id -> [(topic, partition, lowest offset)] of its copies in ``table``."""
    if not event_ids:
        return {}
    quoted = ",".join("'" + e.replace("\\", "\\\\").replace("'", "\\'") + "'" for e in event_ids)
    rows = query(
        f"SELECT event_id, topic, partition, min(offset) FROM {table} "
        f"WHERE event_id IN ({quoted}) GROUP BY event_id, topic, partition"
    )
    out: dict[str, list[tuple[str, int, int]]] = {}
    for eid, topic, partition, offset in rows:
        out.setdefault(str(eid), []).append((str(topic), int(partition), int(offset)))
    return out


def first_copies(rows: list[dict[str, Any]], seen: SeenIds, query: Query, table: str) -> list[int]:
    """Indexes of the ``rows`` (of one table, fresh offsets) to keep under the rule above.

    The rows of one event (several in ``steps``) share their event id and offset, and stay
    or go together.
    """
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["partition"], rows[i]["offset"]))
    first_at: dict[str, tuple[str, int, int]] = {}  # event id -> where this batch has it first
    for i in order:
        r = rows[i]
        first_at.setdefault(r["event_id"], (r["topic"], r["partition"], r["offset"]))
    ids = list(first_at)
    hits = seen.candidates([id_hash(e) for e in ids])
    maybe = [e for e, hit in zip(ids, hits, strict=True) if hit]
    stored = stored_copies(table, maybe, query)
    keep = []
    for i in order:
        r = rows[i]
        here = (r["topic"], r["partition"], r["offset"])
        if first_at[r["event_id"]] != here:
            continue  # a lower offset of this batch has it
        if any(_before(c, here) for c in stored.get(r["event_id"], ())):
            continue  # the table has it already, lower or elsewhere
        keep.append(i)
    return keep


def _before(copy: tuple[str, int, int], here: tuple[str, int, int]) -> bool:
    """Whether a stored copy wins over a row at ``here``: lower offset, or another
    (topic, partition) (an event whose key changed: the one stored first stays)."""
    return copy[:2] != here[:2] or copy[2] < here[2]
