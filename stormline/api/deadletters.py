"""Dead letters for operators: list them (reason, source, a decoded preview), replay them.

A letter is named by where it sits on the dead-letters topic, ``partition:offset``. Replay
re-publishes a letter's original key and bytes, unchanged, to its source topic (after the
consumer that refused it was fixed); only this prefix's catalog topics are targets, and a
letter whose bytes were cut (an oversize record) is skipped with that reason. Consumers
downstream are idempotent by event id, so replaying a letter twice does no harm. Reads use
``assign`` and never commit (no trace on the cluster). Used by the API and by
``stormline dead-letters``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from confluent_kafka import KafkaError, Message, TopicPartition
from pydantic import BaseModel

from stormline.runtime.consumer import reader
from stormline.runtime.producer import RecordProducer
from stormline.schemas.catalog import CATALOG, DEAD_LETTERS
from stormline.schemas.models import DeadLetter
from stormline.schemas.serde import DecodeError, Serde
from stormline.settings import Settings

PREVIEW_CHARS = 500


class LetterView(BaseModel):
    letter: str  # partition:offset on the dead-letters topic
    reason: str
    error: str
    source_topic: str
    source_partition: int
    source_offset: int
    consumer_group: str
    occurred_at: str
    bytes: int
    preview: Any = None  # the decoded event (JSON) when it decodes, else text or hex
    replayable: bool


def preview(settings: Settings, serde: Serde, topic: str, value: bytes | None) -> Any:
    """What a letter's bytes say: the event as JSON if it decodes, else text, else hex."""
    if not value:
        return None
    spec = next((s for s in CATALOG if s.name(settings) == topic), None)
    if spec is not None:
        try:
            return json.loads(serde.decode(value, spec.event).model_dump_json())
        except DecodeError:
            pass
    try:
        return value.decode("utf-8")[:PREVIEW_CHARS]
    except UnicodeDecodeError:
        return "hex:" + value[:64].hex()


def _targets(settings: Settings) -> set[str]:
    return {s.name(settings) for s in CATALOG if s is not DEAD_LETTERS}


def _view(settings: Settings, serde: Serde, msg: Message) -> LetterView | None:
    try:
        dl = serde.decode(msg.value(), DeadLetter)
    except DecodeError:
        return None
    cut = "raw_value keeps the first" in dl.error
    return LetterView(
        letter=f"{msg.partition()}:{msg.offset()}",
        reason=dl.error_kind,
        error=dl.error[:2000],
        source_topic=dl.source_topic,
        source_partition=dl.partition,
        source_offset=dl.offset,
        consumer_group=dl.consumer_group,
        occurred_at=dl.occurred_at.isoformat(),
        bytes=len(dl.raw_value or b""),
        preview=preview(settings, serde, dl.source_topic, dl.raw_value),
        replayable=dl.source_topic in _targets(settings) and not cut,
    )


def _read(settings: Settings, wanted: dict[int, tuple[int, int]], timeout: float) -> list[Message]:
    """Messages of the dead-letters topic in [start, end) per partition."""
    topic = DEAD_LETTERS.name(settings)
    c = reader(settings, "dead-letters", **{"enable.partition.eof": True})
    out: list[Message] = []
    try:
        todo = {p for p, (lo, hi) in wanted.items() if hi > lo}
        c.assign([TopicPartition(topic, p, wanted[p][0]) for p in todo])
        deadline = time.monotonic() + timeout
        while todo and time.monotonic() < deadline:
            for msg in c.consume(500, 0.2):
                p, err = msg.partition(), msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF and p is not None:
                        todo.discard(p)
                    continue
                off = msg.offset()
                if p is None or off is None or p not in todo:
                    continue
                if off < wanted[p][1]:
                    out.append(msg)
                if off + 1 >= wanted[p][1]:
                    todo.discard(p)
    finally:
        c.close()
    return out


def _watermarks(settings: Settings, timeout: float) -> dict[int, tuple[int, int]]:
    topic = DEAD_LETTERS.name(settings)
    c = reader(settings, "dead-letters-marks")
    try:
        md = c.list_topics(topic, timeout=timeout).topics.get(topic)
        if md is None or md.error is not None:
            return {}
        return {
            p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            for p in md.partitions
        }
    finally:
        c.close()


def list_letters(
    settings: Settings, serde: Serde, limit: int = 100, timeout: float = 15.0
) -> list[LetterView]:
    """The newest ``limit`` letters of each partition, newest first."""
    wanted = {p: (max(lo, hi - limit), hi) for p, (lo, hi) in _watermarks(settings, 10).items()}
    views = [v for m in _read(settings, wanted, timeout) if (v := _view(settings, serde, m))]
    views.sort(key=lambda v: v.occurred_at, reverse=True)
    return views


def replay(
    settings: Settings, serde: Serde, letters: list[str], timeout: float = 30.0
) -> dict[str, Any]:
    """Re-publish the named letters to their source topics; returns counts and skips."""
    want: dict[int, set[int]] = {}
    for name in letters:
        p, _, o = name.partition(":")
        want.setdefault(int(p), set()).add(int(o))
    wanted = {p: (min(offs), max(offs) + 1) for p, offs in want.items()}
    found = {f"{m.partition()}:{m.offset()}": m for m in _read(settings, wanted, timeout)}
    producer = RecordProducer(settings)
    topics: dict[str, int] = {}
    skipped: list[str] = []
    try:
        for name in dict.fromkeys(letters):
            msg = found.get(name)
            view = _view(settings, serde, msg) if msg is not None else None
            if msg is None or view is None:
                skipped.append(f"{name}: no such dead letter")
                continue
            if not view.replayable:
                skipped.append(f"{name}: not replayable ({view.source_topic}, {view.bytes} bytes)")
                continue
            dl = serde.decode(msg.value(), DeadLetter)
            producer.produce(dl.source_topic, dl.raw_value, dl.raw_key)
            topics[dl.source_topic] = topics.get(dl.source_topic, 0) + 1
        producer.flush(timeout)
    finally:
        producer.close(5)
    return {"replayed": sum(topics.values()), "topics": topics, "skipped": skipped}
