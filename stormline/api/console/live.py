"""What the console reads from Kafka itself: offsets sampled over time (rates, consumer lag)
and the messages of a topic, decoded.

Offsets come through the admin client (``stormline.runtime.admin``), lag through
``stormline.deploy.ops.group_lag`` (the one of ``stormline status``), messages through an
``assign``-style reader that never commits (``stormline.runtime.consumer.reader``) and the
one serde (``stormline.api.deadletters.preview``). The sampler keeps the samples of the
last ``history_s`` in memory; it samples only while someone looks (each request takes one,
at most one per ``min_interval_s``), so an idle console costs the cluster nothing.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from confluent_kafka import KafkaError, TopicPartition
from confluent_kafka.admin import OffsetSpec

from stormline.api.deadletters import preview
from stormline.deploy.ops import group_lag
from stormline.runtime.admin import admin_client
from stormline.runtime.consumer import reader
from stormline.schemas.catalog import CATALOG
from stormline.schemas.serde import Serde
from stormline.settings import Settings

MAX_MESSAGES = 500


@dataclass
class Sample:
    t: float
    ends: dict[str, list[int]]  # topic -> end offset per partition
    lows: dict[str, list[int]]
    lag: list[dict[str, Any]]


class Sampler:
    def __init__(self, settings: Settings, history_s: float = 900, min_interval_s: float = 1.0):
        self.settings = settings
        self.min_interval_s = min_interval_s
        self.samples: deque[Sample] = deque(maxlen=int(history_s / min_interval_s) + 1)
        self._lock = threading.Lock()
        self._admin: Any = None

    def topics(self, md: Any) -> list[str]:
        """This deployment's topics: those under its prefix (all but Kafka's own if none)."""
        pfx = self.settings.topic_prefix
        return sorted(t for t in md.topics if t.startswith(pfx) and not t.startswith("__"))

    def sample(self) -> Sample:
        """The latest sample, taking a new one when the last is older than the interval."""
        with self._lock:
            if self.samples and time.time() - self.samples[-1].t < self.min_interval_s:
                return self.samples[-1]
            if self._admin is None:
                self._admin = admin_client(self.settings)
            s = self._take(self._admin)
            self.samples.append(s)
            return s

    def _take(self, admin: Any) -> Sample:
        md = admin.list_topics(timeout=10)
        names = self.topics(md)
        tps = [TopicPartition(t, p) for t in names for p in sorted(md.topics[t].partitions)]
        ends: dict[str, list[int]] = {t: [] for t in names}
        lows: dict[str, list[int]] = {t: [] for t in names}
        if tps:
            for spec, out in ((OffsetSpec.latest(), ends), (OffsetSpec.earliest(), lows)):
                futures = admin.list_offsets({tp: spec for tp in tps}, request_timeout=10)
                for tp in tps:
                    out[tp.topic].append(futures[tp].result().offset)
        flat_ends = {(t, p): o for t, offs in ends.items() for p, o in enumerate(offs)}
        flat_lows = {(t, p): o for t, offs in lows.items() for p, o in enumerate(offs)}
        lag = [g.__dict__ for g in group_lag(admin, flat_ends, flat_lows, timeout=10)]
        return Sample(time.time(), ends, lows, lag)

    def history(self) -> list[Sample]:
        with self._lock:
            return list(self.samples)


def totals(s: Sample) -> dict[str, int]:
    return {t: sum(offs) for t, offs in s.ends.items()}


def rates(samples: list[Sample], window_s: float = 10.0) -> tuple[dict[str, float], list[Any]]:
    """Messages per second per topic over the last ``window_s``, and per pair of samples
    (the chart): [[t, {topic: rate}], ...]."""
    if len(samples) < 2:
        return {}, []
    last = samples[-1]
    first = next((s for s in samples if last.t - s.t <= window_s), samples[-2])
    if first is last:
        first = samples[-2]
    now = _rate(first, last)
    series = [[b.t, _rate(a, b)] for a, b in pairwise(samples)]
    return now, series


def _rate(a: Sample, b: Sample) -> dict[str, float]:
    dt = max(b.t - a.t, 1e-6)
    ta, tb = totals(a), totals(b)
    return {t: max(tb[t] - ta.get(t, 0), 0) / dt for t in tb}


def group_totals(lag: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for g in lag:
        out[g["group"]] = out.get(g["group"], 0) + int(g["lag"])
    return out


def catalog_of(settings: Settings) -> dict[str, Any]:
    """Topic name -> its catalog entry, for this prefix."""
    return {spec.name(settings): spec for spec in CATALOG}


def _text(b: bytes | None) -> str | None:
    if b is None:
        return None
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "hex:" + b[:64].hex()


def browse(
    settings: Settings,
    serde: Serde,
    topic: str,
    sample: Sample,
    partition: int | None = None,
    offset: int | None = None,
    limit: int = 50,
    timeout: float = 10.0,
) -> list[dict[str, Any]]:
    """Up to ``limit`` messages per partition: from ``offset`` when given, else the newest;
    decoded from Avro with the catalog's event type, else shown as text or hex."""
    limit = max(1, min(limit, MAX_MESSAGES))
    ends, lows = sample.ends[topic], sample.lows[topic]
    parts = range(len(ends)) if partition is None else [partition]
    wanted: dict[int, tuple[int, int]] = {}
    for p in parts:
        lo, hi = lows[p], ends[p]
        start = max(lo, hi - limit) if offset is None else max(lo, offset)
        if start < hi:
            wanted[p] = (start, min(hi, start + limit))
    msgs = _read(settings, topic, wanted, timeout)
    spec = catalog_of(settings).get(topic)
    out = []
    for m in msgs:
        ts_type, ts = m.timestamp()
        value = m.value()
        out.append(
            {
                "partition": m.partition(),
                "offset": m.offset(),
                "key": _text(m.key()),
                "timestamp": ts if ts_type else None,
                "bytes": len(value or b""),
                "schema_id": int.from_bytes(value[1:5], "big") if _framed(value) else None,
                "headers": {k: _text(v) for k, v in (m.headers() or [])},
                "value": preview(settings, serde, topic, value),
                "event": spec.event.__name__ if spec is not None else None,
            }
        )
    out.sort(key=lambda r: (r["timestamp"] or 0, r["offset"]), reverse=True)
    return out


def _framed(value: bytes | None) -> bool:
    return bool(value) and len(value or b"") >= 5 and (value or b"\x01")[0] == 0


def _read(
    settings: Settings, topic: str, wanted: dict[int, tuple[int, int]], timeout: float
) -> list[Any]:
    c = reader(settings, "console-topics", **{"enable.partition.eof": True})
    out: list[Any] = []
    try:
        todo = set(wanted)
        if not todo:
            return out
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
