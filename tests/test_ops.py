"""Operator status against the real broker: lag, agent health, checkpoints, recent DLQ."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from confluent_kafka import Producer, TopicPartition

from stormline.deploy.ops import collect
from stormline.runtime.connection import confluent_config
from stormline.schemas.catalog import DEAD_LETTERS, TASKS
from stormline.schemas.kafka import EventConsumer, EventProducer
from stormline.schemas.models import (
    AgentHealthChanged,
    CheckpointPublished,
    DeadLetter,
    HealthStatus,
    TaskSubmitted,
)
from stormline.settings import Settings
from tests.conftest import settings_env

CLI = [sys.executable, "-m", "stormline.cli"]


def _consume_and_commit(settings: Settings, serde: Any, group: str, n: int) -> None:
    """Consume exactly ``n`` tasks in ``group`` and commit them."""
    c = EventConsumer(settings, serde, group, [TASKS])
    seen: list[Any] = []
    deadline = time.monotonic() + 30
    try:
        while len(seen) < n and time.monotonic() < deadline:
            for msg in c.raw.consume(1, 0.5):
                if msg.error() is None:
                    seen.append(msg)
        assert len(seen) == n
        c.raw.commit(
            offsets=[TopicPartition(m.topic(), m.partition(), m.offset() + 1) for m in seen],
            asynchronous=False,
        )
    finally:
        c.close()


def test_status_shows_lag_health_checkpoint_and_recent_dead_letters(
    topics: Settings, serde: Any
) -> None:
    s = topics
    tasks_topic = TASKS.name(s)
    producer = EventProducer(s, serde)
    # Ten tasks, all on partition 0 (the same key) so "consume 3" leaves a known 7 behind.
    producer.publish(
        [TaskSubmitted(task_id="same", task_type="t", prompt=f"p{i}") for i in range(10)]
    )
    producer.publish(
        [
            AgentHealthChanged(agent_id="a1", status=HealthStatus.HEALTHY),
            AgentHealthChanged(agent_id="a2", status=HealthStatus.HEALTHY),
            AgentHealthChanged(
                agent_id="a1",
                status=HealthStatus.DOWN,
                previous=HealthStatus.HEALTHY,
                reason="5 failures",
            ),
            CheckpointPublished(policy="router", version=1, uri="file:///c/1", sha256="1" * 64),
            CheckpointPublished(policy="router", version=2, uri="file:///c/2", sha256="2" * 64),
        ]
    )
    # Two dead letters from two hours ago (written first: Kafka timestamps grow with the
    # log, which offsets_for_times relies on) must not count as "last hour".
    old = Producer(confluent_config(s))
    two_hours_ago = int((time.time() - 7200) * 1000)
    letter = DeadLetter(source_topic=tasks_topic, partition=0, offset=9, error_kind="x", error="x")
    for _ in range(2):
        old.produce(
            DEAD_LETTERS.name(s),
            serde.encode(DEAD_LETTERS.name(s), letter),
            key=b"k",
            timestamp=two_hours_ago,
        )
    assert old.flush(10) == 0

    for i in range(3):
        producer.produce(
            DeadLetter(
                source_topic=tasks_topic, partition=0, offset=i, error_kind="decode", error="x"
            )
        )
    producer.flush()
    group = f"{s.topic_prefix}ops-group"
    _consume_and_commit(s, serde, group, 3)

    st = collect(s, serde)
    assert st.error == ""
    by_topic = {t.name: t for t in st.topics}
    assert by_topic[tasks_topic].messages == 10
    assert by_topic[tasks_topic].partitions == s.default_partitions
    mine = [g for g in st.lag if g.group == group]
    assert sum(g.lag for g in mine) == 7
    (p,) = [g for g in mine if g.committed >= 0]
    assert (p.committed, p.end_offset, p.lag) == (3, 10, 7)
    assert {a.agent_id: a.status for a in st.agents} == {"a1": "down", "a2": "healthy"}
    assert next(a for a in st.agents if a.agent_id == "a1").reason == "5 failures"
    assert [(c.policy, c.version, c.uri) for c in st.checkpoints] == [("router", 2, "file:///c/2")]
    assert st.dead_letters_last_hour == 3

    out = subprocess.run(
        [*CLI, "status", "--json"], env=settings_env(s), capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert {x["name"] for x in doc["services"]} >= {"kafka", "redis", "clickhouse"}
    assert doc["group_lag"][group] == 7
    assert doc["dead_letters_last_hour"] == 3
    assert doc["checkpoints"][0]["version"] == 2
    assert {t["name"]: t["messages"] for t in doc["topics"]}[tasks_topic] == 10

    table = subprocess.run(
        [*CLI, "status"],
        env={**settings_env(s), "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert table.returncode == 0, table.stderr
    flat = " ".join(table.stdout.split())
    assert "Stormline services" in flat and "dead letters in the last hour: 3" in flat
    assert group in table.stdout


def test_status_watch_refreshes(topics: Settings) -> None:
    import threading

    proc = subprocess.Popen(
        [*CLI, "status", "--json", "--watch", "0.5"],
        env=settings_env(topics),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout or []), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        # Each refresh prints one JSON document that begins with the services.
        while "".join(out).count('"services"') < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "--watch must keep running"
    finally:
        proc.terminate()
        proc.wait(20)
    assert "".join(out).count('"services"') >= 2


def test_status_says_what_to_do_when_kafka_is_down(settings: Settings) -> None:
    from tests.conftest import free_port

    dead = settings.model_copy(update={"kafka_bootstrap_servers": f"127.0.0.1:{free_port()}"})
    st = collect(dead, timeout=2)
    assert "did not answer" in st.error and "STORMLINE_KAFKA_BOOTSTRAP_SERVERS" in st.error
