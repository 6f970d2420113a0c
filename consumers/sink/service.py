"""The ClickHouse sink: every Stormline topic into ClickHouse tables, exactly once in effect.

``stormline sink`` consumes all catalog topics in the ``stormline-sink`` group and turns each
event into rows (:mod:`.tables`: one table per event type, Trajectory steps flattened into
``steps``), built per table and batch column by column (:meth:`.columns.Table.arrow`), each
record decoded once, by the poll. It buffers until ``sink_batch_size`` events or
``sink_flush_seconds`` have passed, writes the buffer through the store
(:mod:`.store`: Parquet parts read by chDB by default, a ClickHouse server
when ``STORMLINE_CLICKHOUSE_URL`` is set), and only then commits the offsets.

Why it is exactly once in effect:

* a crash (kill -9) after a write and before the commit redelivers that batch; the store
  reports, per table and (topic, partition), the highest offset already stored, and the
  sink drops rows at or below it, so the redelivered batch adds nothing (offsets are
  committed through the runtime's one commit discipline, ``stormline.runtime.commits``);
* a re-sent event (the same event id at a later offset: a re-sent trajectory, a re-scored
  reward) is dropped too: of the copies of an event id in a table the lowest offset's stays
  (:mod:`.dedup`), so every table holds one row per event id;
* a zombie sink (dropped from the group after ``sink_max_poll_interval_s`` without a poll,
  still finishing a write) may write a part over the new owner's offsets: readers take each
  offset from one part (:func:`.store.read_plan`), so its rows count once;
* a record whose rows cannot be made or held (no table for its type, a value its column's
  type cannot hold) is dead-lettered with the reason and lands in no table; the rest of its
  batch is written;
* parts are immutable and renamed into place atomically, so a crash mid-write leaves no
  partial part; the high-water marks are re-read whenever partitions are assigned; every
  ``sink_compact_interval_s`` the sink merges the small parts of the partitions it owns;
* a failed write (server down, disk full) is retried with the one backoff policy
  (``stormline.runtime.retry``: exponential, full jitter), the partitions paused meanwhile
  so the consumer stays in its group and nothing is committed or dropped; when partitions
  are revoked the buffer is flushed first, or, if the store is still failing, the revoked
  partitions' rows and positions are dropped so the next owner re-reads them.

Why the sink and ``stormline analytics`` run together: no process opens a chDB data path;
the sink only writes Parquet files and every reader queries them with its own in-memory
chDB session (see :mod:`.store`).
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from confluent_kafka import TopicPartition

from stormline import metrics
from stormline.consumers.sink.dedup import SeenIds, first_copies, id_hash
from stormline.consumers.sink.store import Store, open_store
from stormline.consumers.sink.tables import BY_NAME, SINK_SPECS, TABLES, tables_of
from stormline.runtime.consumer import position
from stormline.runtime.retry import RetryPolicy
from stormline.schemas.kafka import EventConsumer, Received
from stormline.schemas.serde import Serde
from stormline.settings import Settings

log = logging.getLogger("stormline.sink")


@dataclass
class SinkStats:
    events: int = 0
    rows: int = 0
    skipped: int = 0  # rows of offsets already stored (a redelivery)
    duplicates: int = 0  # rows of event ids already stored at a lower offset (a re-send)
    batches: int = 0
    failures: int = 0
    first_record_at: float | None = None  # monotonic time the first event arrived
    last_write_at: float | None = None  # monotonic time the last write finished
    # This process's CPU seconds (every thread) at those two moments: the sink's own cost.
    first_record_cpu: float | None = None
    last_write_cpu: float | None = None
    per_table: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class Sink:
    def __init__(
        self,
        settings: Settings,
        *,
        store: Store | None = None,
        group_id: str | None = None,
        serde: Serde | None = None,
    ) -> None:
        self.settings = settings
        self.store = store or open_store(settings)
        self.serde = serde or Serde.from_settings(settings)
        # A write may be retried for a while: the partitions are paused and polled, so
        # the group never sees a stuck member (max.poll.interval.ms is not at risk).
        # Past it, a sink stuck in a write is dropped from the group; a part it finishes
        # later is read once (store.read_plan) and holds the same rows as the new owner's.
        poll_ms = int(settings.sink_max_poll_interval_s * 1000)
        overrides: dict[str, Any] = {
            "max.poll.interval.ms": poll_ms,
            "session.timeout.ms": min(10_000, poll_ms),
        }
        self.consumer = EventConsumer(
            settings, self.serde, group_id or settings.sink_group, SINK_SPECS, **overrides
        )
        topics = [s.name(settings) for s in SINK_SPECS]
        self.consumer.raw.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        self._buffer: list[Received[Any]] = []
        self._buffer_since: float | None = None
        self._high: dict[str, dict[tuple[str, int], int]] = {}
        self._seen: dict[str, SeenIds] = {}
        self._stop = threading.Event()
        self._assigned = False
        self._paused = False
        self._compacted_at = time.monotonic()
        self.stats = SinkStats()

    # ------------------------------------------------------------------ rebalances --
    def _on_assign(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        # Another sink may have written these partitions since we last owned them.
        self._high.clear()
        self._seen.clear()
        self._assigned = True
        if self._paused:  # the store is failing: new partitions wait too
            _consumer.pause(partitions)
        log.info("assigned %d partitions", len(partitions))

    def _on_revoke(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        if not self._buffer:
            return
        try:
            self._write_and_commit()
        except Exception as exc:
            lost = {(tp.topic, tp.partition) for tp in partitions}
            self._buffer = [r for r in self._buffer if (r.topic, r.partition) not in lost]
            self.consumer.forget(lost)
            log.warning("store failing at revoke (%s); the next owner re-reads them", exc)

    # ------------------------------------------------------------------------ loop --
    def stop(self) -> None:
        self._stop.set()

    def run(self, *, until_idle: float | None = None) -> SinkStats:
        """Consume until :meth:`stop` (or SIGTERM in the CLI); flush and commit on the way out.

        ``until_idle``: also stop once nothing arrived for that many seconds after the first
        assignment (tests, backfills).
        """
        s = self.settings
        idle_since = time.monotonic()
        # What the process built before serving (imports, pyarrow, clients: ~120,000 objects)
        # lives as long as it serves: out of the collector's reach, a full collection walks
        # only the buffer and what serving made (as in the worker and the API).
        gc.collect()
        gc.freeze()
        try:
            while not self._stop.is_set():
                batch = self.consumer.poll_batch(min(s.sink_batch_size, 5000), timeout=0.2)
                if batch.records or batch.dead or not self._assigned:
                    idle_since = time.monotonic()
                if batch.records and self.stats.first_record_at is None:
                    self.stats.first_record_at = time.monotonic()
                    self.stats.first_record_cpu = time.process_time()
                if batch.records and self._buffer_since is None:
                    self._buffer_since = time.monotonic()
                self._buffer.extend(batch.records)
                full = len(self._buffer) >= s.sink_batch_size
                old = (
                    self._buffer_since is not None
                    and time.monotonic() - self._buffer_since >= s.sink_flush_seconds
                )
                if full or old or (batch.dead and not self._buffer):
                    self._flush_with_retry()
                    idle_since = time.monotonic()  # a write is activity, however long
                self._maybe_compact()
                if until_idle is not None and time.monotonic() - idle_since >= until_idle:
                    break
            self._flush_with_retry()
        finally:
            gc.unfreeze()
            self.consumer.close()
            self.store.close()
        return self.stats

    def _flush_with_retry(self) -> None:
        """Write and commit the buffer, retried with the one backoff policy while it fails.

        While the store fails, the partitions are paused and the waits serve the group
        (:meth:`_idle_poll`). Stopping with a failing store leaves the buffer uncommitted,
        to be read again.
        """
        policy = RetryPolicy(base_s=0.2, max_s=self.settings.sink_retry_max_seconds)
        retrying = policy.retrying(
            lambda exc: isinstance(exc, Exception) and not self._stop.is_set(),
            log=log,
            what="sink write",
            sleep=self._idle_poll,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self._attempt_write()
        except Exception:
            if not self._stop.is_set():
                raise
            log.warning("stopping with %d unwritten events uncommitted", len(self._buffer))
            self._buffer.clear()
            self.consumer.forget()
        if self._paused:
            self._paused = False
            self.consumer.raw.resume(self.consumer.raw.assignment())

    def _attempt_write(self) -> None:
        try:
            self._write_and_commit()
        except Exception:
            self.stats.failures += 1
            metrics.SINK_FAILURES.inc()
            if not self._paused:
                self._paused = True
                self.consumer.raw.pause(self.consumer.raw.assignment())
            raise

    def _idle_poll(self, seconds: float) -> None:
        """Serve the group (heartbeats, rebalances) while paused, reading nothing."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._stop.is_set():
            msg = self.consumer.raw.poll(min(0.2, max(deadline - time.monotonic(), 0)))
            if msg is not None and msg.error() is None:
                # Paused partitions return nothing; should one slip through, rewind to it.
                self.consumer.raw.seek(TopicPartition(*position(msg)))

    def _maybe_compact(self) -> None:
        """Merge small Parquet parts now and then (chDB back-end; a server merges itself)."""
        compact = getattr(self.store, "compact", None)
        every = self.settings.sink_compact_interval_s
        if compact is None or every <= 0 or time.monotonic() - self._compacted_at < every:
            return
        self._compacted_at = time.monotonic()
        owned = {(tp.topic, tp.partition) for tp in self.consumer.raw.assignment()}
        for table in TABLES:
            try:
                n = compact(table, target_rows=self.settings.sink_compact_target_rows, only=owned)
            except Exception as exc:  # compaction is an optimisation: never stop the sink
                log.warning("compacting %s failed: %s", table, exc)
                continue
            if n:
                log.info("compacted %d parts of %s", n, table)

    def _high_water(self, table: str) -> dict[tuple[str, int], int]:
        if table not in self._high:
            self._high[table] = self.store.high_water(table)
        return self._high[table]

    def _query_rows(self, sql: str) -> list[tuple[Any, ...]]:
        return self.store.query(sql).rows

    def _seen_ids(self, table: str) -> SeenIds:
        if table not in self._seen:
            if self._high_water(table):
                self._seen[table] = SeenIds.load(table, self.store.query_arrow)
            else:  # nothing stored in the table: no query (a chDB session's start) to ask
                self._seen[table] = SeenIds(np.empty(0, np.uint64))
        return self._seen[table]

    def _by_table(self) -> dict[str, list[Received[Any]]]:
        """The buffer's records per table they land in, each record decoded once (the poll
        did it); a record of a type without a table is dead-lettered."""
        tables: dict[str, list[Received[Any]]] = defaultdict(list)
        for rec in self._buffer:
            try:
                landing = tables_of(type(rec.event))
            except TypeError as exc:  # a poison record must not block the sink
                self.consumer.dead_letter_failed(rec, exc)
                continue
            for table in landing:
                tables[table.name].append(rec)
        return tables

    def _new_offsets(self, table: str, recs: list[Received[Any]]) -> list[Received[Any]]:
        """The records at offsets the table does not hold yet (a redelivery adds nothing)."""
        high = self._high_water(table)
        fresh = [r for r in recs if r.offset > high.get((r.topic, r.partition), -1)]
        if len(fresh) < len(recs):
            rows = BY_NAME[table].row_count
            self.stats.skipped += sum(rows(r.event) for r in recs) - sum(
                rows(r.event) for r in fresh
            )
        return fresh

    def _built(self) -> dict[str, tuple[list[Received[Any]], pa.Table, list[int]]]:
        """Per table: its records at new offsets, their rows as Arrow, and how many rows each
        record became. A record whose rows cannot be made is dead-lettered and lands in no
        table (a poison record must not block the sink)."""
        fresh = {t: self._new_offsets(t, recs) for t, recs in self._by_table().items()}
        built: dict[str, tuple[pa.Table, list[int]]] = {}
        poison: dict[int, tuple[Received[Any], Exception]] = {}
        for table, recs in fresh.items():
            if not recs:
                continue
            try:
                built[table] = BY_NAME[table].arrow(recs, [r.event for r in recs])
            except Exception:  # find which: one at a time
                for rec in recs:
                    try:
                        BY_NAME[table].arrow([rec], [rec.event])
                    except Exception as exc:
                        poison.setdefault(id(rec), (rec, exc))
        for rec, why in poison.values():
            self.consumer.dead_letter_failed(rec, why)
        out = {}
        for table, recs in fresh.items():
            if poison and any(id(r) in poison for r in recs):
                recs = [r for r in recs if id(r) not in poison]
                if recs:
                    built[table] = BY_NAME[table].arrow(recs, [r.event for r in recs])
            if recs:
                out[table] = (recs, *built[table])
        return out

    def _first_copies(
        self, table: str, recs: list[Received[Any]], data: pa.Table, counts: list[int]
    ) -> tuple[list[Received[Any]], pa.Table, list[str]]:
        """Of the records (at new offsets) and their rows, the first copy of each event id
        (:mod:`.dedup`), with their event ids; the rows of one record stay or go together."""
        ids = [str(r.event.event_id) for r in recs]
        copies = [
            {"topic": r.topic, "partition": r.partition, "offset": r.offset, "event_id": eid}
            for r, eid in zip(recs, ids, strict=True)
        ]
        keep = sorted(first_copies(copies, self._seen_ids(table), self._query_rows, table))
        if len(keep) == len(recs):
            return recs, data, ids
        starts = np.cumsum([0, *counts])
        rows = [i for k in keep for i in range(starts[k], starts[k + 1])]
        kept = data.take(pa.array(rows, pa.int64()))
        self.stats.duplicates += data.num_rows - kept.num_rows
        return [recs[k] for k in keep], kept, [ids[k] for k in keep]

    def _write_and_commit(self) -> None:
        written = 0
        for table, (fresh, data, counts) in self._built().items():
            recs, rows, ids = self._first_copies(table, fresh, data, counts)
            if not recs:
                continue
            try:
                self.store.insert(table, rows)
            except Exception:
                # Some (topic, partition) parts may have landed: re-read before the retry.
                self._high.pop(table, None)
                self._seen.pop(table, None)
                raise
            high = self._high[table]
            for r in recs:
                key = (r.topic, r.partition)
                high[key] = max(high.get(key, -1), r.offset)
            self._seen[table].add([id_hash(eid) for eid in ids])
            self.stats.per_table[table] += rows.num_rows
            metrics.SINK_ROWS.labels(table).inc(rows.num_rows)
            written += rows.num_rows
        self.consumer.commit()
        if self._buffer:
            self.stats.batches += 1
            self.stats.events += len(self._buffer)
            self.stats.rows += written
            self.stats.last_write_at = time.monotonic()
            self.stats.last_write_cpu = time.process_time()
            log.info("wrote %d events as %d rows", len(self._buffer), written)
        self._buffer = []
        self._buffer_since = None


def run_sink(settings: Settings) -> SinkStats:
    """The `stormline sink` service: runs until SIGTERM/SIGINT, then flushes and commits."""
    metrics.serve(settings.metrics_port, "sink", settings.metrics_host)
    sink = Sink(settings)

    def _term(_sig: int, _frame: Any) -> None:
        sink.stop()

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGINT, _term)
    log.info("sink consuming %d topics into %s", len(SINK_SPECS), type(sink.store).__name__)
    stats = sink.run()
    log.info("sink stopped after %d events, %d rows", stats.events, stats.rows)
    return stats
