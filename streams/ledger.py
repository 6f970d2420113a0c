"""Counting each agent outcome exactly once: the router's ledger. Pure, no I/O.

The ledger table holds, per task, the outcome counted for each of its attempts
(:class:`streams.qtable.AttemptLedger`), and, per partition, the statistics shards of the pairs
(task type, agent) whose outcomes landed there (:mod:`streams.shards`). It outlives the task's
record for as long as the rewards topic keeps its records, so a redelivered reward, a replayed
topic or a task id published again is recognised; and it is on disk (RocksDB) by default, so
that is not every task in memory.

Exactly once, across kills: a batch's writes go out in the order :meth:`OutcomeLedger.
take_writes` gives, the shards before the task entries that record their outcomes, and a
changelog partition keeps its writes' order. After a kill between the two, an outcome is
processed again and finds no entry; the shard remembers the ids of the outcomes its last write
counted (:attr:`streams.shards.Shard.recent`) and says it was counted already.

A human reward replaces the automatic outcome of its attempt once, in either order, at the
weight a discount has left it (:meth:`OutcomeLedger.count`); one that names no attempt (given by
ids) finds it by its trajectory (:meth:`OutcomeLedger.attempt_of`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from stormline.schemas.lifecycle import FINAL, TaskState
from stormline.streams.qtable import (
    EXPIRY,
    HUMAN,
    SEP,
    AttemptLedger,
    Entry,
    QCell,
    cell_key,
)
from stormline.streams.shards import RECENT, Shard, ShardBook

META = "\x00"  # keys of the router's own entries in its tables (never a task id)
MISSING_TYPE = "<none>"  # an outcome that names no task type, of a task this router never knew


def shard_key(partition: int, pair: str) -> str:
    """The ledger table's key of a statistics shard (its partition is in the key)."""
    return f"{META}{partition}{SEP}{pair}"


def shard_index_key(partition: int) -> str:
    """The ledger table's key listing the pairs that have a shard on ``partition``."""
    return f"{META}{partition}"


def outcome_id(task_id: str, attempt: int, kind: str) -> str:
    """A short id of one counted outcome (what a shard remembers)."""
    raw = f"{task_id}{SEP}{attempt}{SEP}{kind}".encode()
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


def ledger_entry(
    rec: Mapping[str, Any],
    attempts: dict[str, Any],
    now: float,
    stored: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A task's ledger entry: its counted outcomes, its partition and type, whether the task
    is done (a record in a final state), when last touched."""
    state = rec.get("state")
    done = bool((stored or {}).get("done")) or (
        state is not None and TaskState(str(state)) in FINAL
    )
    return {
        "p": int(rec.get("p", (stored or {}).get("p", 0))),
        "task_type": rec.get("task_type") or (stored or {}).get("task_type") or MISSING_TYPE,
        "a": attempts,
        "t": now,
        "done": done,
    }


class OutcomeLedger:
    """The ledger table and the statistics book, counted into together.

    With ``buffered`` (the app) writes wait until :meth:`take_writes`, once per batch;
    otherwise (pure tests) they go straight to ``table``.
    """

    def __init__(
        self,
        table: MutableMapping[str, Any],
        book: ShardBook,
        counters: dict[str, int],
        discount: float | None = None,
        retention_s: float = 30 * 24 * 3600.0,
    ) -> None:
        self.table = table
        self.book = book
        self.counters = counters
        self.discount = discount  # per shard (streams.qtable.shard_discount)
        self.retention_s = retention_s
        self.buffered = False
        self._buf: dict[str, dict[str, Any]] = {}
        self._dirty: set[tuple[int, str]] = set()  # (partition, pair) shards to write
        self.indexed: dict[int, set[str]] = {}  # pairs with a stored shard, per partition
        for name in ("rewards_applied", "rewards_replaced", "rewards_duplicate"):
            counters.setdefault(name, 0)
        for name in ("rewards_recovered", "expiries_counted"):
            counters.setdefault(name, 0)

    # -- reads and writes --
    def get(self, key: str) -> Any:
        value = self._buf.get(key)
        return value if value is not None else self.table.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        if self.buffered:
            self._buf[key] = value
        else:
            self.table[key] = value

    def done(self, task_id: str) -> bool:
        """Whether ``task_id`` finished (its entry says so; one from a reward alone does not)."""
        return bool((self.get(task_id) or {}).get("done"))

    def finished(self, task_id: str, rec: Mapping[str, Any], now: float) -> None:
        """A finished task's record goes: its entry says it is done (written if it did not)."""
        entry = self.get(task_id)
        if not (entry or {}).get("done"):
            self.put(task_id, ledger_entry(rec, (entry or {}).get("a") or {}, now, entry))

    def take_writes(self, now: float = 0.0) -> list[tuple[str, dict[str, Any]]]:
        """What the table must get for the outcomes counted since the last call, in the
        order that keeps the counting exact: shard indexes and shards first, then the task
        entries (each value names its partition, ``p``)."""
        shards = []
        for p, pair in sorted(self._dirty):
            shard = self.book.shard(p, pair)
            shards.append((shard_key(p, pair), shard.to_dict(p)))
            shard.written(now)
        self._dirty.clear()
        buf, self._buf = self._buf, {}
        meta = [(k, v) for k, v in buf.items() if k.startswith(META)]
        entries = [(k, v) for k, v in buf.items() if not k.startswith(META)]
        return meta + shards + entries

    def load_partition(self, p: int, carry_until: float = 0.0) -> dict[str, Shard]:
        """The shards of partition ``p`` as the table keeps them (after a rebalance); the
        outcomes of their last writes are remembered until ``carry_until``."""
        pairs = (self.table.get(shard_index_key(p)) or {}).get("pairs", [])
        self.indexed[p] = set(pairs)
        return {
            pair: Shard.from_dict(self.table.get(shard_key(p, pair)), carry_until) for pair in pairs
        }

    def expired(
        self, items: Iterable[tuple[str, Mapping[str, Any] | None]], now: float
    ) -> list[tuple[int, str]]:
        """(partition, task id) of the entries past the rewards topic's retention."""
        horizon = now - self.retention_s
        return [
            (int(v.get("p", 0)), k)
            for k, v in items
            if not k.startswith(META) and v and float(v.get("t", now)) < horizon
        ]

    # -- counting --
    def attempt_of(
        self,
        task_id: str,
        trajectory_id: str,
        agent: str,
        attempt: int,
        kind: str,
        rec: Mapping[str, Any],
    ) -> int:
        """The attempt an outcome is about. A human reward may name none (attempt 0: given
        by ids, `stormline reward` or the API): its trajectory's, else the latest of its
        agent's attempts whose outcome names no trajectory (an expiry), else 0. Whatever
        already counts for the reward's trajectory, under any attempt, is that attempt."""
        ledger = AttemptLedger((self.get(task_id) or {}).get("a"))
        found = ledger.attempt_of(trajectory_id)
        if found is not None:
            return found
        if kind != HUMAN or attempt:
            return attempt
        for n, tid in (rec.get("trajs") or {}).items():
            if tid == trajectory_id:
                return int(n)
        unnamed = ledger.unnamed_attempt_of(agent)
        return unnamed if unnamed is not None else 0

    def count(
        self,
        task_id: str,
        rec: Mapping[str, Any],
        agent: str,
        attempt: int,
        value: float,
        kind: str,
        now: float,
        trajectory_id: str = "",
    ) -> bool:
        """Count one attempt's outcome (False if it counts already): its shard, then the
        entry that records it."""
        stored = self.get(task_id)
        ledger = AttemptLedger((stored or {}).get("a"))
        decision = ledger.decide(attempt, kind)
        if decision.action == "duplicate":
            self.counters["rewards_duplicate"] += 1
            return False
        p = int(rec.get("p", 0))
        task_type = str(rec.get("task_type") or (stored or {}).get("task_type") or MISSING_TYPE)
        old = decision.old
        target = old.agent if old is not None else agent
        pair = cell_key(task_type, target)
        oid = outcome_id(task_id, attempt, kind)
        shard = self.book.shard(p, pair)
        if shard.counted(oid):
            self.counters["rewards_recovered"] += 1  # counted before a kill; entry was not
        else:
            cell = QCell.from_dict(shard.cell.to_dict())
            if old is not None:
                cell.replace(old.value, value, self._decayed(cell, old))
                self.counters["rewards_replaced"] += 1
            else:
                cell.update(value, self.discount)
                self.counters["expiries_counted" if kind == EXPIRY else "rewards_applied"] += 1
            new = Shard(cell, [*shard.recent, oid], shard.carried, shard.carried_until)
            self._store_shard(p, pair, new)
        counted_at = old.counted_at if old is not None else self.book.shard(p, pair).cell.count
        ledger.record(attempt, Entry(target, value, kind, trajectory_id, counted_at))
        entry = ledger_entry(rec, ledger.to_dict(), now, stored)
        entry["task_type"] = task_type
        self.put(task_id, entry)
        return True

    def _decayed(self, cell: QCell, old: Entry) -> float:
        """What ``old`` weighs in ``cell`` now: the discount to the number of outcomes the
        shard counted since (1 without a discount, or for an entry from before this was
        recorded)."""
        if self.discount is None or old.counted_at is None:
            return 1.0
        return float(self.discount ** max(cell.count - old.counted_at, 0))

    def _store_shard(self, p: int, pair: str, shard: Shard) -> None:
        indexed = self.indexed.setdefault(p, set())
        if pair not in indexed:
            indexed.add(pair)
            self.put(shard_index_key(p), {"p": p, "pairs": sorted(indexed)})
        self.book.put(p, pair, shard)
        if self.buffered:
            self._dirty.add((p, pair))
        else:
            self.table[shard_key(p, pair)] = shard.to_dict(p)
            shard.recent = shard.recent[-RECENT:]  # written per outcome: the last few do
