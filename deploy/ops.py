"""Operator status from Kafka alone: topics, consumer lag, agent health, checkpoints, DLQ.

Everything here reads the cluster, never another Stormline process: agent health is the
latest AgentHealthChanged per agent on ``agent-health`` (the router's published view), the
latest checkpoint is read from ``checkpoints``, and dead letters of the last hour are counted
with ``offsets_for_times``. Reads use ``assign`` with no group commit, so status leaves no
trace on the cluster.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient

from stormline.runtime.admin import admin_client
from stormline.runtime.consumer import reader as status_reader
from stormline.schemas.catalog import AGENT_HEALTH, CATALOG, CHECKPOINTS, DEAD_LETTERS
from stormline.schemas.models import AgentHealthChanged, CheckpointPublished
from stormline.schemas.serde import DecodeError, Serde
from stormline.settings import Settings


@dataclass
class TopicInfo:
    name: str
    partitions: int
    end_offsets: list[int]
    exists: bool = True

    @property
    def messages(self) -> int:
        return sum(self.end_offsets)


@dataclass
class GroupLag:
    group: str
    state: str
    topic: str
    partition: int
    committed: int  # -1: nothing committed yet (lag counts from the low watermark)
    end_offset: int
    lag: int


@dataclass
class AgentHealthRow:
    """One agent's latest AgentHealthChanged as a status row (the router's own health state
    machine is :class:`stormline.streams.health.AgentHealth`)."""

    agent_id: str
    status: str
    previous: str
    reason: str
    since: str


@dataclass
class CheckpointInfo:
    policy: str
    version: int
    uri: str
    promoted: bool
    published_at: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class OpsStatus:
    bootstrap_servers: str
    topics: list[TopicInfo] = field(default_factory=list)
    lag: list[GroupLag] = field(default_factory=list)
    agents: list[AgentHealthRow] = field(default_factory=list)
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    dead_letters_last_hour: int = 0
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for t, td in zip(self.topics, d["topics"], strict=True):
            td["messages"] = t.messages
        d["group_lag"] = _group_totals(self.lag)
        return d


def _group_totals(lag: list[GroupLag]) -> dict[str, int]:
    out: dict[str, int] = {}
    for g in lag:
        out[g.group] = out.get(g.group, 0) + g.lag
    return out


def _watermarks(c: Consumer, topic: str, partitions: int) -> list[tuple[int, int]]:
    return [
        c.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in range(partitions)
    ]


def collect(settings: Settings, serde: Serde | None = None, timeout: float = 10.0) -> OpsStatus:
    """One snapshot of the cluster as the operator sees it. Never raises for a dead cluster:
    the returned status carries the error instead."""
    st = OpsStatus(settings.bootstrap_servers)
    try:
        admin = admin_client(settings)
        md = admin.list_topics(timeout=timeout)
    except Exception as exc:
        st.error = (
            f"Kafka at {settings.bootstrap_servers} did not answer ({exc}); run `stormline up` "
            "or set STORMLINE_KAFKA_BOOTSTRAP_SERVERS"
        )
        return st
    reader = status_reader(settings, "status", **{"enable.partition.eof": True})
    try:
        lows: dict[tuple[str, int], int] = {}
        for spec in CATALOG:
            name = spec.name(settings)
            if name not in md.topics:
                st.topics.append(TopicInfo(name, 0, [], exists=False))
                continue
            n = len(md.topics[name].partitions)
            marks = _watermarks(reader, name, n)
            lows.update({(name, p): lo for p, (lo, _hi) in enumerate(marks)})
            st.topics.append(TopicInfo(name, n, [hi for _lo, hi in marks]))
        ends = {(t.name, p): hi for t in st.topics for p, hi in enumerate(t.end_offsets)}
        st.lag = group_lag(admin, ends, lows, timeout)
        serde = serde or Serde.from_settings(settings)
        st.agents = _agent_health(settings, reader, serde, st)
        st.checkpoints = _checkpoints(settings, reader, serde, st)
        st.dead_letters_last_hour = _recent_dead_letters(settings, reader, st)
    finally:
        reader.close()
    return st


def group_lag(
    admin: AdminClient,
    ends: dict[tuple[str, int], int],
    lows: dict[tuple[str, int], int],
    timeout: float = 10.0,
) -> list[GroupLag]:
    """Lag of every consumer group that has committed offsets on one of ``ends``' topics."""
    from confluent_kafka import ConsumerGroupTopicPartitions

    listing = admin.list_consumer_groups(request_timeout=timeout).result(timeout)
    groups = {g.group_id: str(getattr(g.state, "name", g.state)) for g in listing.valid}
    # One request per group (the API takes one); all in flight at once.
    futures = {
        gid: admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(gid)], request_timeout=timeout
        )[gid]
        for gid in groups
    }
    topics = {t for t, _p in ends}
    out: list[GroupLag] = []
    for gid, fut in futures.items():
        try:
            res = fut.result(timeout)
        except Exception:
            continue  # the group vanished between the two calls
        for tp in res.topic_partitions or []:
            if tp.topic not in topics:
                continue
            end = ends.get((tp.topic, tp.partition), 0)
            committed = tp.offset if tp.offset >= 0 else -1
            base = committed if committed >= 0 else lows.get((tp.topic, tp.partition), 0)
            out.append(
                GroupLag(
                    gid,
                    groups[gid],
                    tp.topic,
                    tp.partition,
                    committed,
                    end,
                    max(end - base, 0),
                )
            )
    out.sort(key=lambda g: (g.group, g.topic, g.partition))
    return out


def _read_all(reader: Consumer, topic: TopicInfo, deadline: float) -> list[Any]:
    """Every message of ``topic`` up to its current end offsets."""
    todo = {p for p, hi in enumerate(topic.end_offsets) if hi > 0}
    if not todo:
        return []
    reader.assign([TopicPartition(topic.name, p, 0) for p in todo])
    # offset 0 may be below the low watermark: auto.offset.reset=earliest handles that.
    out = []
    while todo and time.monotonic() < deadline:
        for msg in reader.consume(500, 0.5):
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    todo.discard(msg.partition())
                continue
            out.append(msg)
            # A message that is not an error always has both; the stubs make them optional.
            part, offset = msg.partition(), msg.offset()
            if part is not None and offset is not None and offset + 1 >= topic.end_offsets[part]:
                todo.discard(part)
    reader.unassign()
    return out


def _topic(st: OpsStatus, name: str) -> TopicInfo | None:
    return next((t for t in st.topics if t.name == name and t.exists), None)


def _agent_health(
    settings: Settings, reader: Consumer, serde: Serde, st: OpsStatus
) -> list[AgentHealthRow]:
    t = _topic(st, AGENT_HEALTH.name(settings))
    if t is None:
        return []
    latest: dict[str, AgentHealthChanged] = {}
    for msg in _read_all(reader, t, time.monotonic() + 15):
        try:
            ev = serde.decode(msg.value(), AgentHealthChanged)
        except DecodeError:
            continue  # the router's consumers dead-letter it; status just skips it
        cur = latest.get(ev.agent_id)
        if cur is None or ev.occurred_at >= cur.occurred_at:
            latest[ev.agent_id] = ev
    return [
        AgentHealthRow(
            a.agent_id, a.status.value, a.previous.value, a.reason, a.occurred_at.isoformat()
        )
        for a in sorted(latest.values(), key=lambda a: a.agent_id)
    ]


def _checkpoints(
    settings: Settings, reader: Consumer, serde: Serde, st: OpsStatus
) -> list[CheckpointInfo]:
    """The latest checkpoint of each policy."""
    t = _topic(st, CHECKPOINTS.name(settings))
    if t is None:
        return []
    latest: dict[str, CheckpointPublished] = {}
    for msg in _read_all(reader, t, time.monotonic() + 15):
        try:
            ev = serde.decode(msg.value(), CheckpointPublished)
        except DecodeError:
            continue
        cur = latest.get(ev.policy)
        if cur is None or ev.version >= cur.version:
            latest[ev.policy] = ev
    return [
        CheckpointInfo(
            c.policy, c.version, c.uri, c.promoted, c.occurred_at.isoformat(), dict(c.metrics)
        )
        for c in sorted(latest.values(), key=lambda c: c.policy)
    ]


def _recent_dead_letters(
    settings: Settings, reader: Consumer, st: OpsStatus, window_s: float = 3600.0
) -> int:
    t = _topic(st, DEAD_LETTERS.name(settings))
    if t is None:
        return 0
    since_ms = int((time.time() - window_s) * 1000)
    found = reader.offsets_for_times(
        [TopicPartition(t.name, p, since_ms) for p in range(t.partitions)], timeout=10
    )
    total = 0
    for tp in found:
        if tp.offset >= 0:  # -1: no record at or after that time in this partition
            total += t.end_offsets[tp.partition] - tp.offset
    return total


def print_ops(console: Any, st: OpsStatus) -> None:
    """Rich tables for a terminal."""
    from rich.markup import escape
    from rich.table import Table

    if st.error:
        console.print(f"[red]{escape(st.error)}[/red]")
        return
    t = Table(title=f"topics on {st.bootstrap_servers}")
    for col in ("topic", "partitions", "end offsets", "messages"):
        t.add_column(col, overflow="fold")  # ids stay whole
    for ti in st.topics:
        if not ti.exists:
            t.add_row(ti.name, "[red]missing[/red]", "", "")
            continue
        t.add_row(ti.name, str(ti.partitions), " ".join(map(str, ti.end_offsets)), str(ti.messages))
    console.print(t)

    t = Table(title="consumer groups: lag per partition")
    for col in ("group", "state", "topic", "partition", "committed", "end", "lag"):
        t.add_column(col, overflow="fold")  # ids stay whole
    for g in st.lag:
        lag = f"[yellow]{g.lag}[/yellow]" if g.lag else "0"
        committed = str(g.committed) if g.committed >= 0 else "-"
        t.add_row(
            escape(g.group), g.state, g.topic, str(g.partition), committed, str(g.end_offset), lag
        )
    for group, total in _group_totals(st.lag).items():
        t.add_row(f"[bold]{escape(group)}[/bold]", "", "", "", "", "total", f"[bold]{total}[/bold]")
    console.print(t)

    t = Table(title="agent health (latest agent-health event per agent)")
    for col in ("agent", "status", "previous", "reason", "since"):
        t.add_column(col, overflow="fold")  # ids stay whole
    colour = {"healthy": "green", "degraded": "yellow", "down": "red"}
    for a in st.agents:
        c = colour.get(a.status, "white")
        t.add_row(
            escape(a.agent_id), f"[{c}]{a.status}[/{c}]", a.previous, escape(a.reason), a.since
        )
    console.print(t)

    t = Table(title="latest checkpoint per policy")
    for col in ("policy", "version", "promoted", "published", "uri"):
        t.add_column(col, overflow="fold")  # ids stay whole
    for cp in st.checkpoints:
        t.add_row(
            cp.policy, str(cp.version), "yes" if cp.promoted else "no", cp.published_at, cp.uri
        )
    console.print(t)
    n = st.dead_letters_last_hour
    console.print(f"dead letters in the last hour: {'[red]' + str(n) + '[/red]' if n else '0'}")
