"""Event contracts through the real broker and registry: foreign decoders, dead letters, topics."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import fastavro
from confluent_kafka import DeserializingConsumer, Producer
from confluent_kafka.admin import NewTopic
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import StringDeserializer

from stormline.runtime.admin import admin_client
from stormline.schemas import models as m
from stormline.schemas.catalog import DEAD_LETTERS, TASKS, spec_for
from stormline.schemas.compat import check, registry_compatible
from stormline.schemas.kafka import EventConsumer, EventProducer, ensure_topics
from stormline.schemas.serde import Serde, parsed_schema, schema_str
from stormline.settings import Settings
from tests.conftest import settings_env
from tests.test_schemas import full_examples


def test_a_foreign_confluent_consumer_decodes_every_event(topics: Settings, serde: Serde) -> None:
    events = full_examples()
    producer = EventProducer(topics, serde)
    for ev in events:
        producer.produce(ev)
    producer.flush()

    registry = SchemaRegistryClient({"url": topics.registry_url, "timeout": 30})
    for ev in events:
        consumer = DeserializingConsumer(
            {
                "bootstrap.servers": topics.bootstrap_servers,
                "group.id": f"{topics.topic_prefix}foreign",
                "auto.offset.reset": "earliest",
                "key.deserializer": StringDeserializer("utf_8"),
                "value.deserializer": AvroDeserializer(registry),
            }
        )
        consumer.subscribe([spec_for(ev).name(topics)])
        msg = None
        deadline = time.monotonic() + 90
        while msg is None and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
        consumer.close()
        assert msg is not None and msg.error() is None, type(ev).__name__
        assert msg.key() == ev.key()
        assert type(ev).model_validate(msg.value()) == ev


def _raw_task_bytes(serde: Serde, topic: str, record: dict) -> bytes:  # type: ignore[type-arg]
    buf = io.BytesIO()
    buf.write(b"\x00" + serde.register(topic, m.TaskSubmitted).to_bytes(4, "big"))
    fastavro.schemaless_writer(buf, parsed_schema(m.TaskSubmitted), record)
    return buf.getvalue()


def test_bad_input_goes_to_dead_letters_and_the_next_record_is_processed(
    topics: Settings, serde: Serde
) -> None:
    settings = topics.model_copy(update={"max_record_bytes": 4000})
    topic = TASKS.name(settings)
    good = m.TaskSubmitted(task_id="good-1", task_type="x", prompt="p")
    encoded = serde.encode(topic, good)
    invalid = good.model_dump()
    invalid["priority"] = 99
    bad = {
        "random": b"\x07" + os.urandom(63),  # never a 0 magic byte by chance
        "truncated": encoded[:12],
        "unknown-id": b"\x00\x7f\xff\xff\xf0" + encoded[5:],
        "invalid": _raw_task_bytes(serde, topic, invalid),
        "oversize": serde.encode(
            topic, m.TaskSubmitted(task_id="big", task_type="x", prompt="y" * 5000)
        ),
    }
    raw = Producer({"bootstrap.servers": settings.bootstrap_servers})
    for key, value in bad.items():
        raw.produce(topic, key=key, value=value, partition=0)
    raw.produce(topic, key=good.task_id, value=encoded, partition=0)
    assert raw.flush(10) == 0

    consumer = EventConsumer(settings, serde, f"{settings.topic_prefix}dlq-test", [TASKS])
    received = []
    deadline = time.monotonic() + 90
    while not received and time.monotonic() < deadline:
        received += consumer.poll_batch(100, 1.0).records
    consumer.commit()
    consumer.close()
    assert [r.event for r in received] == [good]

    letters = _read_all(settings, serde, DEAD_LETTERS, expect=len(bad))
    by_key = {dl.raw_key.decode(): dl for dl in letters}
    assert set(by_key) == set(bad)
    assert by_key["random"].error_kind == "framing"
    assert by_key["truncated"].error_kind == "avro"
    assert by_key["unknown-id"].error_kind == "unknown-schema"
    assert by_key["invalid"].error_kind == "validation"
    assert "priority" in by_key["invalid"].error
    assert by_key["oversize"].error_kind == "oversize"
    assert "STORMLINE_MAX_RECORD_BYTES" in by_key["oversize"].error
    for key, dl in by_key.items():
        assert dl.source_topic == topic and dl.partition == 0 and dl.error
        if key != "oversize":
            assert dl.raw_value == bad[key]


def _read_all(settings: Settings, serde: Serde, spec, expect: int) -> list:  # type: ignore[no-untyped-def,type-arg]
    consumer = EventConsumer(
        settings, serde, f"{settings.topic_prefix}reader-{spec.logical}", [spec]
    )
    out = []
    deadline = time.monotonic() + 90
    while len(out) < expect and time.monotonic() < deadline:
        out += [r.event for r in consumer.poll_batch(100, 1.0)]
    consumer.close()
    return out


def test_topics_are_created_idempotently_and_drift_is_reported(settings: Settings) -> None:
    admin = admin_client(settings)
    wrong = TASKS.name(settings)
    admin.create_topics([NewTopic(wrong, 1, 1)])[wrong].result(10)
    first = {s.spec.logical: s for s in ensure_topics(settings)}
    assert first["tasks"].drift and "partitions 1" in first["tasks"].drift[0]
    assert first["rewards"].created and not first["rewards"].drift
    second = {s.spec.logical: s for s in ensure_topics(settings)}
    assert not any(s.created for s in second.values())
    assert second["rewards"].partitions == settings.default_partitions
    assert second["tasks"].drift


def test_registry_compatibility_endpoint_agrees(settings: Settings) -> None:
    results = check(registry_url=settings.registry_url)
    assert {r.method for r in results} == {"fastavro", "registry"}
    assert all(r.compatible for r in results)
    incompatible = json.loads(schema_str(m.Reward))
    incompatible["fields"].append({"name": "judge_id", "type": "string"})
    assert not registry_compatible(
        settings.registry_url, schema_str(m.Reward), json.dumps(incompatible)
    )


def test_schema_cli_commands(settings: Settings) -> None:
    env = settings_env(settings)
    cli = [sys.executable, "-m", "stormline.cli"]
    reg = subprocess.run(
        [*cli, "schemas", "register"], env=env, capture_output=True, text=True, timeout=120
    )
    assert reg.returncode == 0, reg.stderr
    assert "TaskSubmitted" in reg.stdout
    chk = subprocess.run(
        [*cli, "schemas", "check"], env=env, capture_output=True, text=True, timeout=120
    )
    assert chk.returncode == 0, chk.stderr + chk.stdout
    bad = subprocess.run(
        [*cli, "schemas", "register"],
        env={**env, "STORMLINE_SCHEMA_REGISTRY_URL": "http://127.0.0.1:9/x"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 3  # infrastructure unreachable
    assert "did not answer" in " ".join(bad.stderr.split())
