"""The sink's batches built column by column (issue 16): the same rows and parts as one row
at a time, and a record whose rows cannot be stored is dead-lettered instead of blocking it."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from stormline.consumers.sink.service import Sink
from stormline.consumers.sink.store import ParquetStore, parts_dir
from stormline.consumers.sink.tables import BY_NAME, DECLARED, Origin, arrow_table, rows_of
from stormline.schemas.catalog import DEAD_LETTERS
from stormline.schemas.models import DeadLetter, Event
from stormline.schemas.serde import Serde
from stormline.settings import Settings
from tests import sink_data
from tests.test_publish import read_topic, trajectory
from tests.test_schemas import full_examples
from tests.test_sink import _committed_all, _counts, _expected, _publish


def _events() -> list[Event]:
    return [*sink_data.make(n_tasks=30).events(), *full_examples()]


def test_a_batch_built_column_by_column_is_the_rows_of_each_event() -> None:
    events = _events()
    origins = [
        Origin(f"topic-{i % 2}", i % 3, 100 + i, 1_700_000_000_000 + i, f"k{i}")
        for i in range(len(events))
    ]
    for table in DECLARED:
        mine = [
            (o, e) for o, e in zip(origins, events, strict=True) if e.__class__ is table.topic.event
        ]
        assert mine, f"no event lands in {table.name}: no test"
        rows = [row for o, e in mine for name, row in rows_of(o, e) if name == table.name]
        built, counts = table.arrow([o for o, _ in mine], [e for _, e in mine])
        assert built.equals(arrow_table(table.name, rows)), table.name
        assert counts == [table.row_count(e) for _, e in mine]
        assert sum(counts) == len(rows)


def test_a_part_written_from_arrow_is_the_part_written_from_rows(tmp_path: Path) -> None:
    table = BY_NAME["steps"]  # several rows a record
    events = [e for e in _events() if e.__class__ is table.topic.event]
    assert len(events) > 10
    origins = [Origin("tr", i % 3, 10 + i, 0, None) for i in range(len(events))]
    shuffled = list(zip(origins, events, strict=True))
    random.Random(5).shuffle(shuffled)  # parts come out per partition, in offset order
    rows = [row for o, e in shuffled for _, row in rows_of(o, e) if _ == "steps"]
    from_rows, from_arrow = ParquetStore(tmp_path / "rows"), ParquetStore(tmp_path / "arrow")
    from_rows.insert("steps", rows)
    from_arrow.insert("steps", table.arrow([o for o, _ in shuffled], [e for _, e in shuffled])[0])
    names = sorted(p.name for p in from_rows.parts("steps"))
    assert names == sorted(p.name for p in from_arrow.parts("steps")) and len(names) == 3
    for name in names:
        a = pq.read_table(tmp_path / "rows" / "steps" / name)
        b = pq.read_table(tmp_path / "arrow" / "steps" / name)
        assert a.equals(b), name


def test_a_record_its_table_cannot_hold_is_dead_lettered_and_the_rest_written(
    topics: Settings, serde: Serde
) -> None:
    """A trajectory whose attempt fits the model and Avro but not the Int32 column: before,
    the store's write failed on it for ever (retried, nothing committed); now it goes to
    dead-letters with the reason, lands in no table (steps neither), and the rest is written."""
    ds = sink_data.make(n_tasks=10)
    _publish(topics, serde, ds)
    poison = trajectory("too-big", attempt=2**40)
    _publish_one(topics, serde, poison)
    s = topics.model_copy(
        update={"sink_group": f"{topics.topic_prefix}sink", "sink_flush_seconds": 0.3}
    )
    store = ParquetStore(parts_dir(s))
    sink = Sink(s, store=store, serde=serde)
    done: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: done.update(stats=sink.run(until_idle=3.0)))
    runner.start()
    runner.join(90)
    if runner.is_alive():
        sink.stop()
        runner.join(60)
        raise AssertionError("the sink did not get past the record it cannot store in 90 s")
    want = _expected(ds)
    want["dead_letters"] += 1  # its own, which the sink reads back like any other
    assert {t: c[0] for t, c in _counts(store).items()} == want
    n = want["dead_letters"]
    letters = [serde.decode(m.value(), DeadLetter) for m in read_topic(s, DEAD_LETTERS, n)]
    ours = [d for d in letters if d.source_topic.endswith("trajectories")]
    assert [(d.key(), d.error_kind) for d in ours] == [("too-big", "handler")]
    assert "too large" in ours[0].error
    assert _committed_all(s, s.sink_group)


def _publish_one(settings: Settings, serde: Serde, event: Event) -> None:
    from stormline.schemas.kafka import EventProducer

    producer = EventProducer(settings, serde)
    producer.publish([event])
    producer.close()


def test_arrow_rows_keep_their_schema(tmp_path: Path) -> None:
    """A table given in another column order is cast to the table's schema, not refused."""
    table = BY_NAME["rewards"]
    events = [e for e in _events() if e.__class__ is table.topic.event]
    data, _ = table.arrow([Origin("rw", 0, i, 0, None) for i in range(len(events))], events)
    reordered = data.select(list(reversed(data.column_names)))
    store = ParquetStore(tmp_path)
    store.insert("rewards", pa.Table.from_batches(reordered.to_batches()))
    got = store.query("SELECT count(), min(offset), max(offset) FROM rewards").rows
    assert got == [(len(events), 0, len(events) - 1)]
