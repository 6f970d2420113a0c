"""The fleet's bandit statistics: one shard per (partition, task type, agent), merged. Pure.

Tasks, trajectories and rewards are keyed by task id, so the outcomes of a (task type, agent)
pair land on every partition of those topics. The router worker that owns partition ``p``
counts them in its shard ``(p, type, agent)``; it alone writes that shard, in its ledger
table beside the per-task ledgers (streams/router.py says why there). Every worker publishes
the shards it changed to a compacted topic and reads everyone's, so what a decision reads,
:meth:`ShardBook.cell`, is the sum over every partition of: the shard itself where this worker
owns the partition, else the latest snapshot published by whoever does. Decisions thus use the
whole fleet's experience, a moment old (the publish interval plus a fetch).

A shard also remembers the outcomes folded into it by its last write (:attr:`Shard.recent`).
A kill can land between the write of a shard and the writes of the ledger entries that say
its outcomes were counted; such an outcome is then processed again, finds no ledger entry,
and would be counted twice. Its id in ``recent`` says it was counted already.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stormline.streams.qtable import QCell, merge, split_key

RECENT = 16  # outcomes a shard remembers when it is written per outcome (no batches)


@dataclass
class Shard:
    """One partition's statistics of one pair, and the outcomes folded into it since its
    last write (``recent``) or by the last write before this process loaded it
    (``carried``: kept, and written again, until ``carried_until``, because their ledger
    entries may have been lost with a kill and their rewards may come again)."""

    cell: QCell = field(default_factory=QCell)
    recent: list[str] = field(default_factory=list)
    carried: list[str] = field(default_factory=list)
    carried_until: float = 0.0

    def counted(self, outcome_id: str) -> bool:
        return outcome_id in self.recent or outcome_id in self.carried

    def to_dict(self, partition: int) -> dict[str, Any]:
        ids = [*self.carried, *self.recent]
        return {"p": partition, "cell": self.cell.to_dict(), "recent": ids}

    def written(self, now: float) -> None:
        """The shard was written: its outcomes are on the changelog from now on."""
        self.recent = []
        if now >= self.carried_until:
            self.carried = []

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, carry_until: float = 0.0) -> Shard:
        if not data:
            return cls()
        ids = list(data.get("recent") or ())
        return cls(QCell.from_dict(data.get("cell")), [], ids, carry_until)


def newer(a: QCell, b: QCell | None) -> bool:
    """Whether snapshot ``a`` is newer than ``b``: outcomes and corrections only grow, then
    assignments (which a kill may lose a few of)."""
    return b is None or (a.count, a.fixes, a.pulls) > (b.count, b.fixes, b.pulls)


class ShardBook:
    """This worker's shards (owned partitions), everyone's snapshots, and their sums."""

    def __init__(self) -> None:
        self.local: dict[int, dict[str, Shard]] = {}
        self.remote: dict[int, dict[str, QCell]] = {}
        self._parts: dict[str, dict[int, QCell]] = {}  # pair -> partition -> what counts
        self._merged: dict[str, QCell] = {}
        self.dirty: set[tuple[int, str]] = set()  # (partition, pair) changed since published

    # -- reading --
    def cell(self, key: str) -> QCell:
        """The fleet's statistics of the pair ``key`` (read-only: never mutate it)."""
        return self._merged.get(key) or _EMPTY

    def pairs(self) -> dict[str, QCell]:
        return dict(self._merged)

    def owns(self, partition: int) -> bool:
        return partition in self.local

    def shard(self, partition: int, key: str) -> Shard:
        """The shard of ``key`` on an owned ``partition`` (an empty one if none yet)."""
        shards = self.local.setdefault(partition, {})
        s = shards.get(key)
        if s is None:
            s = shards[key] = Shard()
        return s

    # -- this worker's shards --
    def put(self, partition: int, key: str, shard: Shard) -> None:
        """``shard`` is the new state of ``key`` on ``partition`` (owned by this worker)."""
        self.local.setdefault(partition, {})[key] = shard
        self._contribute(key, partition, shard.cell)
        self.dirty.add((partition, key))

    def pull(self, partition: int, key: str) -> None:
        """One more assignment for ``key``; assignments are not written per task (a kill may
        lose a few: UCB's exploration term tolerates that), only published."""
        self.shard(partition, key).cell.pulled()
        merged = self._merged.get(key)
        if merged is None or self._parts.get(key, {}).get(partition) is None:
            self._contribute(key, partition, self.shard(partition, key).cell)
        else:
            merged.pulls += 1
        self.dirty.add((partition, key))

    def own(self, partition: int, shards: Mapping[str, Shard]) -> None:
        """``partition`` is this worker's now, with ``shards`` as its changelog kept them.

        They are published again at once: the last owner may have counted outcomes it never
        published (it lost the partition, or was killed), and the other workers would
        otherwise miss them until the pair's next outcome on this partition."""
        self.local[partition] = dict(shards)
        for key in {*shards, *self.remote.get(partition, {})}:
            s = shards.get(key)
            self._contribute(key, partition, s.cell if s else self.remote[partition][key])
        self.dirty |= {(partition, key) for key in shards}

    def disown(self, partition: int) -> None:
        """``partition`` moved to another worker: its snapshots count from now on."""
        shards = self.local.pop(partition, {})
        remote = self.remote.get(partition, {})
        for key in {*shards, *remote}:
            self._contribute(key, partition, remote.get(key))
        self.dirty = {d for d in self.dirty if d[0] != partition}

    def take_dirty(self) -> list[tuple[int, str, QCell]]:
        """The shards changed since the last call, to publish."""
        out = [
            (p, key, self.local[p][key].cell)
            for p, key in sorted(self.dirty)
            if key in self.local.get(p, {})
        ]
        self.dirty.clear()
        return out

    # -- everyone's snapshots --
    def snapshot(self, partition: int, key: str, cell: QCell) -> None:
        """A published shard (from any worker, this one included)."""
        remote = self.remote.setdefault(partition, {})
        if not newer(cell, remote.get(key)):
            return
        remote[key] = cell
        if partition not in self.local:
            self._contribute(key, partition, cell)

    # -- views --
    def by_type(self) -> dict[str, dict[str, QCell]]:
        out: dict[str, dict[str, QCell]] = {}
        for key, cell in self._merged.items():
            task_type, agent = split_key(key)
            out.setdefault(task_type, {})[agent] = cell
        return out

    def _contribute(self, key: str, partition: int, cell: QCell | None) -> None:
        parts = self._parts.setdefault(key, {})
        if cell is None:
            parts.pop(partition, None)
        else:
            parts[partition] = cell
        # In partition order: the same shards always sum to the same floats.
        self._merged[key] = merge(parts[p] for p in sorted(parts))


_EMPTY = QCell()
