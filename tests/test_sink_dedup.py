"""One row per event id in the sink's tables (issue 15, findings 5 and 7).

Through the real broker and chDB: the same events delivered twice (re-sent: same event ids
at new offsets), and again after a sink restart, are one row each, on both back-ends; a
zombie sink (dropped from its group while finishing a part) writes a part that overlaps the
new owner's, and every offset still counts once.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from stormline.consumers.sink import dedup
from stormline.consumers.sink.service import Sink
from stormline.consumers.sink.store import (
    ParquetStore,
    Part,
    ServerStore,
    live_parts,
    parts_dir,
    read_plan,
)
from stormline.consumers.sink.tables import TABLES, Origin, rows_of
from stormline.schemas.models import Reward
from stormline.schemas.serde import Serde
from stormline.settings import Settings
from tests import sink_data
from tests.test_sink import _committed_all, _expected, _KeepOpen, _publish


def _ids(store: Any) -> dict[str, tuple[int, int]]:
    """rows and distinct event ids (steps: and step) per table."""
    out = {}
    for t in TABLES:
        ident = "event_id" + (", step_index" if t == "steps" else "")
        res = store.query(f"SELECT count(), uniqExact({ident}) FROM {t}")
        out[t] = (int(res.rows[0][0]), int(res.rows[0][1]))
    return out


@pytest.mark.parametrize("backend", ["parquet", "server"])
def test_events_sent_twice_and_after_a_restart_are_one_row_each(
    topics: Settings, serde: Serde, backend: str
) -> None:
    ds = sink_data.make(n_tasks=20)
    want = _expected(ds)
    s = topics.model_copy(
        update={"sink_group": f"{topics.topic_prefix}sink", "sink_flush_seconds": 0.2}
    )
    if backend == "server":
        s = s.model_copy(update={"clickhouse_url": f"chdb://memory/d{uuid.uuid4().hex[:10]}"})
        store: Any = _KeepOpen(ServerStore(s))  # the in-memory database lives with its client
    else:
        store = ParquetStore(parts_dir(s))
    _publish(s, serde, ds)
    _publish(s, serde, ds)  # re-sent: the same events (same ids) at later offsets
    first = Sink(s, store=store, serde=serde).run(until_idle=3.0)
    assert first.events == 2 * len(ds.events())
    assert first.duplicates == sum(want.values())
    assert {t: c[0] for t, c in _ids(store).items()} == want
    assert all(rows == ids for rows, ids in _ids(store).values())

    _publish(s, serde, ds)  # once more, to a restarted sink: it knows only the store
    again = Sink(s, store=store, serde=serde).run(until_idle=3.0)
    assert again.events == len(ds.events()) and again.rows == 0
    assert again.duplicates == sum(want.values())
    assert {t: c[0] for t, c in _ids(store).items()} == want
    assert _committed_all(s, s.sink_group)
    if backend == "server":
        store.inner.close()


class _StuckOnce:
    """The real store; the first insert waits for ``release`` (a write that hangs)."""

    def __init__(self, inner: ParquetStore) -> None:
        self.inner = inner
        self.entered, self.release, self.finished = (threading.Event() for _ in range(3))

    def insert(self, table: str, rows: list[dict[str, Any]]) -> None:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(180), "never released"
            self.inner.insert(table, rows)
            self.finished.set()
            return
        self.inner.insert(table, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _partial_overlaps(parts: list[Part]) -> list[tuple[Part, Part]]:
    """Pairs of parts of one partition that overlap without one holding the other."""
    return [
        (a, b)
        for a in parts
        for b in parts
        if (a.topic, a.partition) == (b.topic, b.partition) and a.first < b.first <= a.last < b.last
    ]


def test_a_zombie_sinks_late_part_counts_once(topics: Settings, serde: Serde) -> None:
    from stormline.schemas.kafka import EventProducer

    # One key: one partition, so the two sinks' parts are runs of the same offsets.
    rewards = [
        Reward(task_id="one", trajectory_id=f"tr{i}", agent_id="a", value=i, source="human")
        for i in range(120)
    ]
    EventProducer(topics, serde).publish(rewards)
    base = topics.model_copy(
        update={
            "sink_group": f"{topics.topic_prefix}sink",
            "sink_flush_seconds": 60.0,  # the zombie's part ends where its batch size says
            "sink_max_poll_interval_s": 10.0,
            "sink_compact_interval_s": 0.0,
        }
    )
    store = ParquetStore(parts_dir(base))
    stuck = _StuckOnce(store)
    zombie = Sink(base.model_copy(update={"sink_batch_size": 45}), store=stuck, serde=serde)
    z = threading.Thread(target=zombie.run, daemon=True)
    z.start()
    assert stuck.entered.wait(60), "the first sink never wrote"
    smaller = {"sink_batch_size": 17, "sink_flush_seconds": 1.0}
    owner = Sink(base.model_copy(update=smaller), store=store, serde=serde)
    o = threading.Thread(target=owner.run, daemon=True)
    o.start()  # joins the group; the stuck sink is dropped after max.poll.interval
    deadline = time.monotonic() + 120
    while owner.stats.rows < len(rewards) and time.monotonic() < deadline:
        time.sleep(0.2)
    # It read everything: the zombie committed nothing.
    assert owner.stats.rows == len(rewards), owner.stats
    stuck.release.set()  # the zombie finishes its part now, over the owner's offsets
    assert stuck.finished.wait(60)
    for sink, thread in ((zombie, z), (owner, o)):
        sink.stop()
        thread.join(60)

    parts = store.parts("rewards")
    assert _partial_overlaps(parts), [p.name for p in parts]  # the case under test happened
    rows, ids = _ids(store)["rewards"]
    assert (rows, ids) == (len(rewards), len(rewards))
    assert store.query("SELECT sum(value) FROM rewards").rows == [(sum(range(120)),)]


def _reward_rows(offsets: range, partition: int = 0) -> list[dict[str, Any]]:
    rows = []
    for o in offsets:
        ev = Reward(
            event_id=uuid.uuid5(uuid.NAMESPACE_OID, str(o)),
            task_id="t",
            trajectory_id=f"r{o}",
            agent_id="a",
            value=o,
            source="human",
        )
        rows += [r for _t, r in rows_of(Origin("rw", partition, o, 0, "t"), ev)]
    return rows


def test_overlapping_parts_are_read_and_compacted_once(tmp_path: Path) -> None:
    store = ParquetStore(tmp_path)
    store.insert("rewards", _reward_rows(range(0, 45)))  # the zombie's part
    for lo in range(0, 120, 17):  # the new owner's parts
        store.insert("rewards", _reward_rows(range(lo, min(lo + 17, 120))))
    plan = read_plan(store.parts("rewards"))
    assert plan[Part("rw", 0, 34, 50)] == 45 and plan[Part("rw", 0, 0, 44)] == 0
    assert Part("rw", 0, 17, 33) not in plan
    want = [(120, 120, sum(range(120)))]
    sql = "SELECT count(), uniqExact(offset), sum(value) FROM rewards"
    assert store.query(sql).rows == want
    store.compact("rewards", target_rows=1000, min_run=2, grace_s=0)
    assert [p.name for p in live_parts(store.parts("rewards"))] == [Part("rw", 0, 0, 119).name]
    assert store.query(sql).rows == want


def test_event_id_hash_is_the_same_in_python_and_sql(tmp_path: Path) -> None:
    store = ParquetStore(tmp_path)
    rows = _reward_rows(range(20))
    rows.append({**_reward_rows(range(20, 21))[0], "event_id": str(uuid.uuid4())})
    store.insert("rewards", rows)
    got = store.query(f"SELECT event_id, {dedup.HASH_SQL} FROM rewards").rows
    assert len(got) == 21 and all(dedup.id_hash(e) == int(h) for e, h in got)
    seen = dedup.SeenIds.load("rewards", store.query_arrow)
    assert len(seen) == 21
    assert seen.candidates([dedup.id_hash(e) for e, _h in got]) == [True] * 21
    assert seen.candidates([dedup.id_hash(str(uuid.uuid4()))]) == [False]
    # An id that is no UUID's text (written by another tool) is always checked exactly.
    assert dedup.id_hash("t0-1") is None and seen.candidates([None]) == [True]


def test_first_copy_wins_and_a_hash_hit_is_checked(tmp_path: Path) -> None:
    store = ParquetStore(tmp_path)
    stored = _reward_rows(range(10, 12))  # event ids of offsets 10 and 11, stored
    store.insert("rewards", stored)
    query = lambda q: store.query(q).rows  # noqa: E731
    batch = [
        {**stored[0], "offset": 20},  # a re-send of 10: dropped
        {**stored[1], "offset": 5},  # 11's id lower than where it is stored: kept
        *_reward_rows(range(30, 32)),  # new: kept ...
        {**_reward_rows(range(30, 31))[0], "offset": 33},  # ... and its re-send in the batch not
    ]
    # Every hash a hit (as a collision would be): the exact check still keeps the new ones.
    everything = dedup.SeenIds(dedup.np.array([dedup.id_hash(r["event_id"]) for r in batch]))
    keep = dedup.first_copies(batch, everything, query, "rewards")
    assert sorted(batch[i]["offset"] for i in keep) == [5, 30, 31]
