"""The router's Kafka plumbing: the Faust app's broker settings, internal topics, the reader.

Every Kafka client here takes its connection (bootstrap servers and SASL/SSL) from the one
runtime config (:class:`stormline.runtime.connection.KafkaConnection`): the Faust app, the
group-less broadcast reader and the admin client that creates the internal topics.

The router reads ``tasks``, ``trajectories`` and ``rewards`` co-partitioned (one partition
count, keyed by task id), and sends ``assignments`` keyed the same way:
:func:`check_copartitioned` refuses to start on topics that differ, with what to do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import faust

from stormline.runtime.admin import TopicWanted, ensure_topics, replication
from stormline.runtime.connection import KafkaConnection
from stormline.runtime.retry import RetryPolicy
from stormline.schemas.catalog import (
    AGENT_HEALTH,
    ASSIGNMENTS,
    CHECKPOINTS,
    HEARTBEATS,
    REWARDS,
    TASKS,
    TRAJECTORIES,
)
from stormline.schemas.models import (
    AgentHealthChanged,
    AgentHeartbeat,
    CheckpointPublished,
    Event,
)
from stormline.schemas.serde import DecodeError, RegistryUnavailable, Serde
from stormline.settings import Settings

# tasks: the live task records (memory); ledger: counted outcomes per task and the statistics
# shards (STORMLINE_ROUTER_STORE); health: one record per agent (memory).
TABLES = ("tasks", "ledger", "health")
BROADCAST_RETRY = RetryPolicy(base_s=0.2, max_s=5.0)
log = logging.getLogger("stormline.router")


def app_id(s: Settings) -> str:
    return f"{s.topic_prefix}{s.router_app_id}"


def replicas(s: Settings) -> int:
    """The replication of the router's topics: the same as every other topic's."""
    return s.router_replication or replication(s).factor


CO_PARTITIONED = (TASKS, TRAJECTORIES, REWARDS, ASSIGNMENTS)


def partitions(s: Settings) -> int:
    """The partition count of the task topics, which the router's topics and tables share."""
    return TASKS.partitions(s)


def check_copartitioned(s: Settings, metadata: Any) -> int:
    """The task topics' one partition count, or a ValueError that says what to change.

    Each task's state lives on its task's partition of every topic; if two of them had
    different counts a task's trajectory would land on a partition another worker owns.
    """
    counts = {
        spec.name(s): len(metadata.topics[spec.name(s)].partitions)
        for spec in CO_PARTITIONED
        if spec.name(s) in metadata.topics
    }
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name} has {n}" for name, n in sorted(counts.items()))
        raise ValueError(
            f"the router needs {', '.join(counts)} with one partition count ({listed}): "
            "recreate the topics with the same count (STORMLINE_TOPIC_PARTITIONS sets it per "
            "topic, STORMLINE_DEFAULT_PARTITIONS for all)"
        )
    count = next(iter(counts.values()), partitions(s))
    # Its own topics (changelogs, health) follow that count; ones left by a router with
    # another count (or by router v1) would put a task's state on another worker.
    stale = {
        w.name: len(metadata.topics[w.name].partitions)
        for w in internal_topics(s, count)
        if w.name in metadata.topics and w.partitions != len(metadata.topics[w.name].partitions)
    }
    if stale:
        listed = ", ".join(f"{name} has {n}" for name, n in sorted(stale.items()))
        raise ValueError(
            f"the router's own topics must have {count} partitions like the task topics "
            f"({listed}): stop the routers, delete those topics (their state is rebuilt from "
            "the task topics' history only for new tasks) or set another "
            "STORMLINE_ROUTER_APP_ID"
        )
    return count


def faust_app(s: Settings, partitions: int, replication_factor: int) -> faust.App:
    """The Faust app with the one connection config and the router's broker settings."""
    # One directory per worker (its web port tells workers on one host apart): RocksDB
    # takes a lock on its files.
    datadir = Path(s.data_dir) / "router" / str(s.router_web_port)
    datadir.mkdir(parents=True, exist_ok=True)
    conn = KafkaConnection.from_settings(s)
    return faust.App(
        app_id(s),
        broker=f"kafka://{conn.bootstrap_servers}",
        broker_credentials=conn.faust_credentials(),
        store="memory://",
        datadir=str(datadir),
        autodiscover=False,
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=partitions,
        topic_replication_factor=replication_factor,
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        # Group joins otherwise take the 30 s defaults after every restart.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        broker_rebalance_timeout=20.0,
        broker_commit_interval=1.0,
        producer_linger_ms=1,
        # As the confluent producers: a task up to STORMLINE_MAX_RECORD_BYTES, forwarded or
        # inside its assignment, is not refused by Faust's 1,000,000-byte default.
        producer_max_request_size=max(s.max_record_bytes * 2, 1_048_576),
        producer_compression_type="lz4",
        producer_acks=-1,
        # Load-bearing: the route agent holds each batch's messages until it is done, and a
        # revoke that waited for every message to be acked would wait on the held ones.
        stream_wait_empty=False,
        web_enabled=True,
        web_host=s.router_web_host,
        web_port=s.router_web_port,
        web_bind=s.router_web_host,
    )


async def unstick_recovery(app: faust.App, stall_s: float) -> list[Any]:
    """Re-seek the changelog partitions a table recovery has waited on for ``stall_s``.

    faust-streaming 0.15.3 on aiokafka 0.14 sometimes never delivers a changelog partition
    a worker takes back after a peer left (seen in about one of ten rebalances back and forth
    here): recovery logs "No event received for active tp" every 5 s and the worker never
    routes again. A seek to the next offset recovery still needs, with the partition
    resumed, makes the fetcher read it again; recovery ignores any offset it has already
    applied, so a seek that was not needed costs a re-read and nothing else.
    Returns the partitions it re-sought."""
    # Faust's interfaces leave recovery's state out; these are its implementation's.
    rec: Any = cast(Any, app.tables).recovery
    consumer: Any = app.consumer
    started = rec._recovery_started_at
    if not rec.in_recovery or started is None or not consumer.flow_active:
        return []
    now = time.monotonic()
    if now - started < stall_s:
        return []
    seen = rec._active_events_received_at
    offsets = {}
    for tp in rec.active_tps:
        read, end = rec.active_offsets.get(tp), rec.active_highwaters.get(tp)
        read = -1 if read is None else read
        if end is not None and read < end and now - seen.get(tp, started) >= stall_s:
            offsets[tp] = read + 1
    if not offsets:
        return []
    log.warning(
        "table recovery has read nothing for %.0f s from %s: seeking them again",
        stall_s,
        ", ".join(f"{tp.topic}[{tp.partition}]@{o}" for tp, o in sorted(offsets.items())),
    )
    try:
        await consumer.seek_wait(offsets)
        consumer.resume_partitions(offsets)
        app.flow_control.resume()
        consumer.resume_flow()
    except Exception:  # a rebalance took them meanwhile: the next recovery reads them
        log.warning("re-seeking the stalled changelog partitions failed", exc_info=True)
        return []
    for tp in offsets:  # the next check waits a full stall again
        seen[tp] = now
    return list(offsets)


def stats_topic(s: Settings) -> str:
    """The compacted topic of statistics shards every router worker publishes and reads."""
    return f"{app_id(s)}-stats"


CLEAN = "clean-shutdown"  # written by a router that stopped cleanly, next to its tables


def reset_tables_after_a_kill(app: faust.App) -> bool:
    """Drop the local table files a killed router left; True if it did.

    RocksDB keeps every write at once, its changelog only once the broker has it; a kill in
    between leaves the local files ahead of the changelog, and Faust, which only replays
    the changelog past the offset it last saw, would keep them: a count or a ledger entry
    the rest of the fleet never sees. Without the mark of a clean stop the files go, and
    recovery rebuilds them from the changelogs (slower, exact)."""
    tabledir = Path(app.conf.tabledir)
    mark = tabledir.parent / CLEAN
    dropped = False
    if tabledir.exists() and not mark.exists():
        shutil.rmtree(tabledir)
        log.warning("the last stop was not clean: table files dropped, rebuilt from changelogs")
        dropped = True
    mark.unlink(missing_ok=True)
    return dropped


def mark_clean_stop(app: faust.App) -> None:
    tabledir = Path(app.conf.tabledir)
    tabledir.parent.mkdir(parents=True, exist_ok=True)
    (tabledir.parent / CLEAN).touch()


def internal_topics(settings: Settings, n: int | None = None) -> list[TopicWanted]:
    """The router's own topics: agent health's input, the shards, the tables' changelogs
    (``n`` partitions: the task topics' count)."""
    n = n or partitions(settings)
    # None: the cluster's replication and min.insync.replicas, as every catalog topic has.
    rf = settings.router_replication
    day = {"retention.ms": str(24 * 3600 * 1000)}
    # Compaction that keeps up: a changelog is read whole when a worker takes a partition.
    compact = {
        "cleanup.policy": "compact",
        "segment.ms": str(600_000),
        "min.cleanable.dirty.ratio": "0.1",
        "delete.retention.ms": str(3_600_000),
    }
    aid = app_id(settings)
    return [
        TopicWanted(f"{aid}-health", n, rf, day),
        TopicWanted(stats_topic(settings), 1, rf, compact),
        *(TopicWanted(f"{aid}-{t}-changelog", n, rf, compact) for t in TABLES),
    ]


def ensure_internal_topics(settings: Settings, n: int | None = None) -> None:
    """Create the router's own topics before Faust starts.

    Faust creates them too, but after its first group assignment; a topic that is missing at
    that moment is left out of the assignment until the next rebalance, and the tasks sent
    to it wait. Creating them first (same names, partition counts and policies) avoids that.
    """
    ensure_topics(settings, internal_topics(settings, n))


def broadcast_config(settings: Settings) -> dict[str, Any]:
    """The group-less reader's aiokafka arguments: the one connection config, no group.

    Before the runtime kernel this reader was built with the bootstrap servers alone, so on
    a SASL/SSL cluster it read no heartbeats and no agent was ever a candidate.
    """
    return {
        **KafkaConnection.from_settings(settings).aiokafka(),
        "group_id": None,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
    }


async def committed_offsets(
    settings: Settings, group: str, tps: set[tuple[str, int]]
) -> dict[tuple[str, int], int | None]:
    """The group's committed offset (the next to read) of each (topic, partition); None
    where the group has committed none."""
    from aiokafka import TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**KafkaConnection.from_settings(settings).aiokafka())
    await admin.start()
    try:
        got = await admin.list_consumer_group_offsets(
            group, partitions=[TopicPartition(t, p) for t, p in sorted(tps)]
        )
    finally:
        await admin.close()
    out: dict[tuple[str, int], int | None] = dict.fromkeys(tps)
    for tp, meta in got.items():
        if meta is not None and meta.offset >= 0:
            out[(tp.topic, tp.partition)] = meta.offset
    return out


async def read_range(
    settings: Settings, topic: str, partition: int, start: int, end: int
) -> list[Any]:
    """The records of offsets [start, end) of one partition (aiokafka ConsumerRecords), read
    without a group. Offsets the log no longer holds (retention) are simply not there."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    tp = TopicPartition(topic, partition)
    consumer = AIOKafkaConsumer(**broadcast_config(settings))
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, start)
        out: list[Any] = []
        while await consumer.position(tp) < end:
            got = await consumer.getmany(tp, timeout_ms=1000, max_records=1000)
            out += [r for r in got.get(tp, []) if start <= r.offset < end]
        return out
    finally:
        await consumer.stop()


Snapshot = tuple[int, str, dict[str, Any]]  # a published shard: partition, pair, cell


class CaughtUp:
    """:func:`read_broadcast`'s marker: every topic read to the end it had at the start."""


CAUGHT_UP = CaughtUp()


async def read_broadcast(
    settings: Settings, serde: Serde
) -> AsyncIterator[Event | Snapshot | CaughtUp]:
    """Heartbeats (the lookback window), agent-health, checkpoints and the statistics shards
    (all), then :data:`CAUGHT_UP` once, then live.

    No consumer group: every router worker reads these topics in full. Records that do not
    decode are skipped here (the group-consuming agents dead-letter them).
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    s = settings
    names: dict[str, type[Event] | None] = {
        HEARTBEATS.name(s): AgentHeartbeat,
        AGENT_HEALTH.name(s): AgentHealthChanged,
        CHECKPOINTS.name(s): CheckpointPublished,
        stats_topic(s): None,
    }
    consumer = AIOKafkaConsumer(**broadcast_config(s))
    await consumer.start()
    try:
        tps = []
        for name in names:
            parts = await _partitions(consumer, name)
            tps += [TopicPartition(name, p) for p in sorted(parts)]
        consumer.assign(tps)
        await _seek(consumer, s, tps)
        ends = await consumer.end_offsets(tps)
        behind = set(tps)
        while True:
            if behind:
                behind = {tp for tp in behind if await consumer.position(tp) < ends[tp]}
                if not behind:
                    yield CAUGHT_UP
            batches = await consumer.getmany(timeout_ms=200, max_records=1000)
            for tp, msgs in batches.items():
                etype = names[tp.topic]
                for m in msgs:
                    if etype is None:
                        snapshot = _snapshot(m.key, m.value)
                        if snapshot is not None:
                            yield snapshot
                        continue
                    event = await _decode_waiting(serde, m.value, etype)
                    if event is not None:
                        yield event
    finally:
        await consumer.stop()


def snapshot_record(partition: int, pair: str, cell: dict[str, Any]) -> tuple[bytes, bytes]:
    """A shard as the stats topic carries it (key: partition and pair; value: JSON)."""
    return f"{partition}\x1e{pair}".encode(), json.dumps(cell).encode()


def _snapshot(key: bytes | None, value: bytes | None) -> Snapshot | None:
    try:
        p, _, pair = (key or b"").decode().partition("\x1e")
        return int(p), pair, json.loads(value or b"")
    except ValueError:
        return None  # not a shard (nothing else writes here): skipped


async def _decode_waiting(serde: Serde, raw: bytes | None, etype: type[Event]) -> Event | None:
    """``raw`` decoded, or None for a record that never will; waits out a registry outage.

    A heartbeat skipped because the registry was away would leave its agent out of every
    router's directory until the next one, and a checkpoint skipped would never be loaded.
    """
    failures = 0
    while True:
        try:
            return serde.decode(raw, etype)
        except DecodeError:
            return None
        except RegistryUnavailable as exc:
            failures += 1
            if failures == 1:
                log.warning("broadcast reader waits for the schema registry: %s", exc)
            await asyncio.sleep(BROADCAST_RETRY.backoff(failures))


async def _partitions(consumer: Any, name: str) -> set[int]:
    """The topic's partitions, waiting up to ~5 s for its metadata (a topic just created)."""
    parts = consumer.partitions_for_topic(name)
    for _ in range(50):
        if parts:
            break
        await consumer._client.force_metadata_update()
        parts = consumer.partitions_for_topic(name)
        await asyncio.sleep(0.1)
    return set(parts or ())


async def _seek(consumer: Any, s: Settings, tps: list[Any]) -> None:
    """Heartbeats from ``router_heartbeat_lookback_s`` ago, the rest from the beginning."""
    hb_tps = [tp for tp in tps if tp.topic == HEARTBEATS.name(s)]
    since_ms = int((time.time() - s.router_heartbeat_lookback_s) * 1000)
    found = await consumer.offsets_for_times({tp: since_ms for tp in hb_tps})
    ends = await consumer.end_offsets(hb_tps)
    for tp in hb_tps:
        off = found.get(tp)
        consumer.seek(tp, off.offset if off is not None else ends[tp])
    await consumer.seek_to_beginning(*[tp for tp in tps if tp not in hb_tps])
