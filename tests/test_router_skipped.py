"""Records Faust never handed to the router are read again before the batch is handled.

Seen in the chaos test (stop 26's fresh-clone run, seed 708539): a router started after a
kill, and faust-streaming 0.15.3 lost the first one or two records after the committed offset
of three task partitions, then committed past them; four tasks were never routed. The router
now checks that each partition's offsets follow on from the group's committed offset and
reads what is missing itself (`Router._read_skipped`). Through the real broker: the group's
offset is committed, records are produced, and the router is shown a batch that starts past
them, as Faust showed it.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from stormline.runtime.connection import KafkaConnection
from stormline.schemas.catalog import TASKS
from stormline.schemas.kafka import ensure_topics
from stormline.settings import Settings
from stormline.streams.app import Router
from stormline.streams.kafka import app_id


def _event(topic: str, partition: int, offset: int) -> Any:
    value = f"record {offset}".encode()
    msg = SimpleNamespace(
        topic=topic, partition=partition, offset=offset, key=b"k", value=value, headers=[]
    )
    return SimpleNamespace(message=msg, value=value)


def test_records_skipped_after_the_committed_offset_are_read_again(
    stack_settings: Settings, tmp_path: Path
) -> None:
    s = stack_settings.model_copy(
        update={"topic_prefix": f"g{uuid.uuid4().hex[:8]}.", "data_dir": tmp_path}
    )
    ensure_topics(s)
    topic = TASKS.name(s)
    conf = KafkaConnection.from_settings(s).confluent()
    producer = Producer(conf)
    for i in range(8):
        producer.produce(topic, key=b"k", value=f"record {i}".encode(), partition=1)
    producer.flush(30)
    # The group has handled offsets 0 and 1 of partition 1, and nothing of partition 2.
    group = Consumer({**conf, "group.id": app_id(s), "enable.auto.commit": False})
    group.commit(offsets=[TopicPartition(topic, 1, 2)], asynchronous=False)
    group.close()

    router = Router(s)
    router.ready = {1, 2}

    async def run() -> tuple[list[Any], list[Any], list[Any]]:
        # Faust hands over offset 4 first: 2 and 3 never reached the router.
        first = await router._read_skipped([_event(topic, 1, 4), _event(topic, 1, 5)])
        # Then 7: 6 went missing in the middle of the stream.
        later = await router._read_skipped([_event(topic, 1, 7)])
        # No committed offset for partition 2: nothing to compare with, nothing read.
        fresh = await router._read_skipped([_event(topic, 2, 3)])
        return first, later, fresh

    first, later, fresh = asyncio.run(run())
    assert [e.message.offset for e in first] == [2, 3, 4, 5]
    assert [e.value for e in first[:2]] == [b"record 2", b"record 3"]  # the broker's records
    assert [e.message.offset for e in later] == [6, 7]
    assert [e.message.offset for e in fresh] == [3]
    assert router.extra["records_read_again"] == 3
