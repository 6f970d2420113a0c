"""`stormline up --brokers 3`: a three-node KRaft cluster on this machine, every topic on it
replicated 3 times with min.insync.replicas=2, and one broker lost (kill -9) without losing an
acknowledged record.

The cluster and its registry are this module's own (free ports, own data directory), since the
tests kill a broker; Redis is the session's.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from stormline.deploy import process
from stormline.runtime.admin import (
    TopicWanted,
    admin_client,
    ensure_topics,
    replication,
    topic_configs,
)
from stormline.runtime.consumer import reader
from stormline.runtime.producer import RecordProducer
from stormline.schemas.kafka import ensure_topics as ensure_catalog
from stormline.settings import Settings
from tests.conftest import free_port, settings_env, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.faults, pytest.mark.timeout(600)]

CLI = [sys.executable, "-m", "stormline.cli"]
JOURNAL = ("kafkasql-journal", "kafkasql-snapshots", "registry-events")


def stormline(s: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=settings_env(s), capture_output=True, text=True, timeout=300
    )


def cluster_settings(base: Settings, root: Any) -> Settings:
    """Three embedded nodes and an embedded registry on free ports, in ``root``."""
    return base.model_copy(
        update={
            "data_dir": root,
            "kafka_bootstrap_servers": None,
            "schema_registry_url": None,
            "kafka_brokers": 3,
            "kafka_port": free_port(),
            "kafka_controller_port": free_port(),
            "kafka_node_ports": [free_port(), free_port()],
            "kafka_node_controller_ports": [free_port(), free_port()],
            "registry_port": free_port(),
            "kafka_heap": "384m",
        }
    )


@pytest.fixture(scope="module")
def cluster(
    stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    s = cluster_settings(stack_settings, tmp_path_factory.mktemp("cluster"))
    up = stormline(s, "up", "--brokers", "3")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield s
    finally:
        down = stormline(s, "down")
        assert down.returncode == 0, down.stderr


def kafka_pid(s: Settings, node_id: int) -> int:
    return int((s.data_dir / "run" / f"kafka-{node_id}.pid").read_text())


def test_status_knows_every_node_and_the_size_is_fixed(cluster: Settings) -> None:
    st = stormline(cluster, "status", "--json", "--services-only")
    assert st.returncode == 0, st.stdout + st.stderr
    rows = {r["name"]: r for r in json.loads(st.stdout)["services"]}
    ports = [p for p, _ in cluster.kafka_nodes()]
    for i, port in enumerate(ports, start=1):
        row = rows[f"kafka-{i}"]
        assert row["healthy"] and row["address"] == f"127.0.0.1:{port}", row
        assert row["pid"] == kafka_pid(cluster, i)
    assert "kafka" not in rows
    # A command that names no size follows the data directory's cluster...
    plain = cluster.model_copy(update={"kafka_brokers": 1})
    env = {k: v for k, v in settings_env(plain).items() if k != "STORMLINE_KAFKA_BROKERS"}
    env = {k: v for k, v in env.items() if not k.startswith("STORMLINE_KAFKA_NODE")}
    follow = subprocess.run(
        [*CLI, "status", "--json", "--services-only"], env=env, capture_output=True, text=True
    )
    names = {r["name"] for r in json.loads(follow.stdout)["services"]}
    assert {"kafka-1", "kafka-2", "kafka-3"} <= names, follow.stdout
    # ...and one that asks for another size is refused: KRaft's quorum is fixed at format.
    one = stormline(cluster, "up", "--brokers", "1")
    assert one.returncode == 1
    flat = " ".join(one.stderr.split())
    assert "holds a 3-node Kafka cluster" in flat and "--brokers 3" in flat, flat


def test_every_topic_is_replicated_three_times_with_min_isr_two(cluster: Settings) -> None:
    s = cluster.model_copy(update={"topic_prefix": f"r{uuid.uuid4().hex[:6]}."})
    rep = replication(s)
    assert (rep.factor, rep.min_insync) == (3, 2)
    catalog = [st.name for st in ensure_catalog(s)]
    admin = admin_client(s)
    md = admin.list_topics(timeout=10)
    names = [*catalog, *JOURNAL, "__consumer_offsets"]
    configs = topic_configs(admin, names)
    for name in names:
        replicas = {len(p.replicas) for p in md.topics[name].partitions.values()}
        assert replicas == {3}, (name, replicas)
        assert configs[name]["min.insync.replicas"] == "2", name


def test_kill9_one_broker_loses_no_acknowledged_record(cluster: Settings) -> None:
    s = cluster
    topic = f"acked-{uuid.uuid4().hex[:6]}"
    ensure_topics(s, [TopicWanted(topic, 3)])
    acked: list[tuple[float, bytes]] = []
    failed: list[str] = []
    stop = threading.Event()
    producer = RecordProducer(s).start()

    def produce() -> None:
        i = 0
        while not stop.is_set():
            value = str(i).encode()

            def done(err: Any, msg: Any, value: bytes = value) -> None:
                if err is None:
                    acked.append((time.monotonic(), value))
                else:
                    failed.append(str(err))

            producer.produce(topic, value, key=value, on_delivery=done)
            i += 1
            time.sleep(0.002)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    wait_until(lambda: len(acked) >= 500, 60, "500 acknowledged records")
    # The victim leads partition 0: its in-flight writes must fail over to a follower.
    leader = admin_client(s).list_topics(topic, timeout=10).topics[topic].partitions[0].leader
    victim = kafka_pid(s, leader)
    before = len(acked)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not process.cmdline(victim), 10, "the broker to die")
    wait_until(lambda: len(acked) >= before + 2000, 120, "writes to go on without it")
    stop.set()
    thread.join(10)
    producer.flush(60)
    producer.close()

    values = _read_all(s, topic)
    lost = {v for _, v in acked} - set(values)
    assert not lost, f"{len(lost)} acknowledged records lost, e.g. {sorted(lost)[:5]}"
    assert len(values) == len(set(values)), "the idempotent producer wrote a record twice"
    times = [t for t, _ in acked]
    stall = max(b - a for a, b in itertools.pairwise(times))
    print(
        f"kill -9 broker {leader}: {len(acked)} acknowledged, {len(failed)} refused, 0 lost; "
        f"longest gap between acknowledgements {stall:.2f}s"
    )

    # Back with a plain `stormline up` (the size comes from the data directory).
    env = {k: v for k, v in settings_env(s).items() if k != "STORMLINE_KAFKA_BROKERS"}
    again = subprocess.run([*CLI, "up"], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert kafka_pid(s, leader) != victim

    def in_sync() -> bool:
        md = admin_client(s).list_topics(topic, timeout=10)
        return all(len(p.isrs) == 3 for p in md.topics[topic].partitions.values())

    wait_until(in_sync, 120, "the restarted broker to rejoin every ISR", 1.0)


def _read_all(s: Settings, topic: str) -> list[bytes]:
    c = reader(s, "acked-check")
    try:
        md = c.list_topics(topic, timeout=10)
        parts = list(md.topics[topic].partitions)
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out: list[bytes] = []
        at = dict.fromkeys(parts, 0)
        deadline = time.monotonic() + 120
        while any(at[p] < ends[p] for p in parts) and time.monotonic() < deadline:
            for msg in c.consume(1000, 1.0):
                if msg.error() is None:
                    out.append(msg.value())
                    at[msg.partition()] = msg.offset() + 1
        return out
    finally:
        c.close()
