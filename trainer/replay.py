"""Replay for retraining: re-read a range of trajectories and rewards, join, and train.

The range is a time window (``--since/--until``, resolved per partition with
``offsets_for_times``) or offsets (``--from-offset/--to-offset``: ``N`` for every partition,
or ``P=N`` / ``topic:P=N`` entries, comma separated). The consumer is assigned partitions
explicitly under a throwaway group id and never commits, so the live ``stormline-trainer``
group's offsets are untouched. In a time window the assignments of that window are read too
(for the logged score and propensity); an offset range reads trajectories and rewards only.

The join is the live one (:class:`trainer.join.Joiner`, event time), so a range yields the
experiences the live trainer built from it: all rewards of a trajectory share a partition
(key ``task_id``), so first-wins picks the same reward in both, and a human reward replaces
the automatic one in both.

``--to-topic NAME`` writes the joined experiences as **JSON** (key ``task_id``), one
:class:`Experience` per record: it is derived data with no catalog schema, and JSON is what
kcat, ClickHouse's ``JSONEachRow``, pandas and jq read with no registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from stormline.runtime.admin import TopicWanted, ensure_topics
from stormline.runtime.consumer import position, reader
from stormline.runtime.producer import DeliveryError, RecordProducer
from stormline.schemas.catalog import ASSIGNMENTS, REWARDS, TRAJECTORIES, TopicSpec
from stormline.schemas.kafka import Received
from stormline.schemas.serde import DecodeError, Serde
from stormline.settings import Settings
from stormline.trainer.join import HUMAN, Experience, Joiner
from stormline.trainer.service import feed, make_joiner

Progress = Callable[[int, int], None]  # (records read, records to read)


class ReplayError(ValueError):
    pass


@dataclass
class Range:
    since: datetime | None = None
    until: datetime | None = None
    from_offset: str | None = None
    to_offset: str | None = None

    def by_time(self) -> bool:
        return self.from_offset is None and self.to_offset is None


@dataclass
class ReplayResult:
    experiences: list[Experience]
    records: int
    dead: int
    evicted: int
    pending: int
    ranges: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)


def parse_offsets(spec: str | None, topic: str, partitions: int) -> dict[int, int]:
    """``"N"`` -> every partition; ``"P=N,topic:P=N"`` -> those (for this logical topic)."""
    if spec is None:
        return {}
    spec = spec.strip()
    if spec.lstrip("-").isdigit():
        return dict.fromkeys(range(partitions), int(spec))
    out: dict[int, int] = {}
    for part in spec.split(","):
        part = part.strip()
        target = None
        if ":" in part:
            target, part = part.split(":", 1)
        if "=" not in part:
            raise ReplayError(f"offset spec {part!r}: write N, P=N or topic:P=N")
        p, o = part.split("=", 1)
        if target is not None and target != topic:
            continue
        if not (p.strip().isdigit() and o.strip().isdigit()):
            raise ReplayError(f"offset spec {part!r}: partition and offset must be integers")
        if int(p) >= partitions:
            raise ReplayError(f"{topic} has {partitions} partitions; there is no partition {p}")
        out[int(p)] = int(o)
    return out


def _bounds(
    consumer: Consumer, settings: Settings, spec: TopicSpec, rng: Range
) -> list[tuple[int, int, int]]:
    """(partition, start, end) with end exclusive, clipped to what the log holds."""
    name = spec.name(settings)
    md = consumer.list_topics(name, timeout=10)
    if name not in md.topics or md.topics[name].error is not None:
        raise ReplayError(f"topic {name} does not exist (run `stormline topics create`)")
    parts = sorted(md.topics[name].partitions)
    marks = {p: consumer.get_watermark_offsets(TopicPartition(name, p), timeout=10) for p in parts}
    if rng.by_time():

        def at(ts: datetime | None, default: str) -> dict[int, int]:
            if ts is None:
                return {p: marks[p][0 if default == "low" else 1] for p in parts}
            ms = int(ts.timestamp() * 1000)
            found = consumer.offsets_for_times([TopicPartition(name, p, ms) for p in parts], 10)
            return {
                tp.partition: (tp.offset if tp.offset >= 0 else marks[tp.partition][1])
                for tp in found
            }

        start, end = at(rng.since, "low"), at(rng.until, "high")
    else:
        lo = parse_offsets(rng.from_offset, spec.logical, len(parts))
        hi = parse_offsets(rng.to_offset, spec.logical, len(parts))
        start = {p: lo.get(p, marks[p][0]) for p in parts}
        end = {p: hi.get(p, marks[p][1]) for p in parts}
    return [
        (p, max(start[p], marks[p][0]), min(end[p], marks[p][1]))
        for p in parts
        if min(end[p], marks[p][1]) > max(start[p], marks[p][0])
    ]


def read_range(
    settings: Settings,
    rng: Range,
    *,
    serde: Serde | None = None,
    joiner: Joiner | None = None,
    progress: Progress | None = None,
) -> ReplayResult:
    serde = serde or Serde.from_settings(settings)
    joiner = joiner or make_joiner(settings)
    consumer = reader(settings, "replay")  # a throw-away group, never committed
    specs = [TRAJECTORIES, REWARDS] + ([ASSIGNMENTS] if rng.by_time() else [])
    try:
        ranges = {s.logical: _bounds(consumer, settings, s, rng) for s in specs}
        records, dead = _read_ranges(consumer, settings, serde, specs, ranges, progress)
    finally:
        consumer.close()
    exps, evicted = _join_in_order(settings, joiner, records)
    return ReplayResult(exps, len(records), dead, evicted, joiner.pending, ranges)


def _read_ranges(
    consumer: Consumer,
    settings: Settings,
    serde: Serde,
    specs: list[TopicSpec],
    ranges: dict[str, list[tuple[int, int, int]]],
    progress: Progress | None,
) -> tuple[list[Received[Any]], int]:
    """The decoded records of ``ranges`` (per logical topic), and how many did not decode."""
    by_name = {s.name(settings): s for s in specs}
    todo = {(s.name(settings), p): end for s in specs for p, _, end in ranges[s.logical]}
    total = sum(end - start for s in specs for _, start, end in ranges[s.logical])
    consumer.assign(
        [
            TopicPartition(s.name(settings), p, start)
            for s in specs
            for p, start, _ in ranges[s.logical]
        ]
    )
    # Assignments first, per partition in order: the join sees context before outcomes
    # as far as possible; results do not depend on it (see the module docstring).
    records: list[Received[Any]] = []
    done, dead = 0, 0
    while todo:
        for msg in consumer.consume(1000, 1.0):
            if msg.error() is not None:
                continue
            topic, partition, offset = position(msg)
            key = (topic, partition)
            end = todo.get(key)
            if end is None or offset >= end:
                continue
            done += 1
            if offset + 1 >= end:
                del todo[key]
                consumer.pause([TopicPartition(*key)])
            try:
                ev = serde.decode(msg.value(), by_name[topic].event)
            except DecodeError:
                dead += 1  # the live consumer dead-lettered it too
                continue
            k = msg.key()
            records.append(
                Received(
                    topic,
                    partition,
                    offset,
                    k.decode("utf-8", "replace") if k else None,
                    ev,
                    msg.timestamp()[1],
                )
            )
        if progress is not None:
            progress(done, total)
    return records, dead


def _join_in_order(
    settings: Settings, joiner: Joiner, records: list[Received[Any]]
) -> tuple[list[Experience], int]:
    """Feed ``records`` (sorted in place by event time) to ``joiner``; (experiences, evicted)."""
    order = {
        ASSIGNMENTS.name(settings): 0,
        TRAJECTORIES.name(settings): 1,
        REWARDS.name(settings): 2,
    }
    records.sort(key=lambda r: (r.timestamp_ms, order[r.topic], r.partition, r.offset))
    exps: list[Experience] = []
    evicted = 0
    for rec in records:
        exps.extend(feed(joiner, rec))
        exps.extend(joiner.release())
        evicted += len(joiner.evict())
    exps.extend(joiner.release(force=True))  # the range is over: no assignment will come
    # A human reward's correction replaces its trajectory's automatic experience, as in the
    # live buffer: one experience per trajectory, in join order.
    final: dict[str, Experience] = {}
    for e in exps:
        if e.reward_source == HUMAN or e.trajectory_id not in final:
            final[e.trajectory_id] = e
    return list(final.values()), evicted


def write_topic(settings: Settings, topic: str, exps: list[Experience], partitions: int = 4) -> int:
    """Write experiences as JSON to ``topic`` (created if missing); returns how many."""
    ensure_topics(settings, [TopicWanted(topic, partitions, 1)], timeout=15)
    prod = RecordProducer(settings)
    for e in exps:
        prod.produce(topic, e.model_dump_json(), e.task_id)
    try:
        prod.flush(30)
    except DeliveryError as exc:
        raise ReplayError(f"writing {topic}: {exc}") from None
    return len(exps)


def replay(
    settings: Settings,
    rng: Range,
    *,
    train: bool = True,
    from_scratch: bool = True,
    to_topic: str | None = None,
    publish: bool = True,
    progress: Progress | None = None,
    learner: Any = None,
) -> dict[str, Any]:
    """Read, join, optionally write ``to_topic``, optionally train and publish a checkpoint."""
    res = read_range(settings, rng, progress=progress)
    summary: dict[str, Any] = {
        "records": res.records,
        "experiences": len(res.experiences),
        "unjoined": res.pending,
        "evicted": res.evicted,
        "undecodable": res.dead,
    }
    if to_topic:
        summary["written"] = write_topic(settings, to_topic, res.experiences)
    if not train or not res.experiences:
        return summary
    summary.update(
        _train(
            settings,
            rng,
            res.experiences,
            from_scratch=from_scratch,
            publish=publish,
            learner=learner,
        )
    )
    return summary


def _train(
    settings: Settings,
    rng: Range,
    experiences: list[Experience],
    *,
    from_scratch: bool,
    publish: bool,
    learner: Any,
) -> dict[str, Any]:
    """Train on ``experiences``, store (and with ``publish`` announce) the checkpoint.

    Returns the checkpoint's summary: version, uri, sha256, promotion and its metrics.
    """
    from stormline.schemas.kafka import EventProducer
    from stormline.trainer.checkpoints import CheckpointStore, load_state_verified
    from stormline.trainer.distributed import RayLearner
    from stormline.trainer.policy import PolicyConfig
    from stormline.trainer.update import checkpoint_uri, run_update

    store = CheckpointStore(checkpoint_uri(settings), settings.trainer_policy_name)
    init = None
    if not from_scratch:
        latest = store.promoted() or store.latest()
        if latest is None:
            raise ReplayError("--fine-tune: there is no checkpoint yet; use --from-scratch")
        init, _ = load_state_verified(*latest)
    own = learner is None
    learner = learner or RayLearner(settings, PolicyConfig()).start()
    producer = EventProducer(settings, Serde.from_settings(settings)) if publish else None
    try:
        out = run_update(
            settings,
            learner,
            store,
            producer,
            experiences,
            init_state=init,
            cfg=learner.cfg,
            extra_meta={"replay": {"from_scratch": from_scratch, "range": str(rng)}},
        )
    finally:
        if producer is not None:
            producer.close()
        if own:
            learner.close()
    return dict(
        version=out.event.version,
        uri=out.event.uri,
        sha256=out.event.sha256,
        promoted=out.event.promoted,
        decision=out.event.decision,
        **{k: round(v, 5) for k, v in out.event.metrics.items()},
    )


def parse_time(text: str | None) -> datetime | None:
    """ISO 8601 (UTC when no zone is given) or a relative ``30m``/``2h``/``7d`` ago."""
    if text is None:
        return None
    from datetime import UTC, timedelta

    t = text.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if t[-1:] in units and t[:-1].isdigit():
        return datetime.now(UTC) - timedelta(seconds=int(t[:-1]) * units[t[-1]])
    try:
        dt = datetime.fromisoformat(t)
    except ValueError as exc:
        raise ReplayError(f"time {text!r}: use ISO 8601 (2026-01-31T12:00) or 30m/2h/7d") from exc
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)
