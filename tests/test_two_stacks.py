"""Two embedded stacks on one machine, on different ports and data directories, side by side.

Each is up, moves a record through its own broker, registers a schema on its own registry,
reports itself healthy, listens on loopback only (Kafka, controller, registry with its Quarkus
management interface, redis-server), and leaves no process behind when it goes down. The
session's shared test stack may be running at the same time: a third one, then.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

from stormline.deploy import process
from stormline.deploy.jars import JarResolver
from stormline.deploy.stack import EmbeddedStack
from stormline.settings import Settings
from tests.conftest import free_port

pytestmark = pytest.mark.slow

_LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket ``pid`` listens on, read from /proc."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                continue
            hex_addr, hex_port = cols[1].split(":")
            assert len(hex_addr) == width
            found.add((_addr(hex_addr), int(hex_port, 16)))
    return found


def _addr(hex_addr: str) -> str:
    import ipaddress

    raw = bytes.fromhex(hex_addr)
    # /proc stores each 32-bit word in host (little-endian) order.
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


def _settings(root: Path) -> Settings:
    # Embedded services only, even when the environment names an external stack.
    return Settings(
        data_dir=root,
        kafka_bootstrap_servers=None,
        schema_registry_url=None,
        redis_url=None,
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        registry_port=free_port(),
        redis_port=free_port(),
    )


@pytest.fixture
def two_stacks(tmp_path: Path) -> Iterator[list[EmbeddedStack]]:
    stacks = [EmbeddedStack(_settings(tmp_path / name)) for name in ("a", "b")]
    try:
        yield stacks
    finally:
        for stack in stacks:
            stack.down()


def test_two_stacks_run_side_by_side_and_leave_nothing(two_stacks: list[EmbeddedStack]) -> None:
    a, b = two_stacks
    for stack in two_stacks:
        stack.up()

    pids: dict[str, list[int]] = {}
    for stack in two_stacks:
        s = stack.s
        statuses = {st.name: st for st in stack.status()}
        for st in statuses.values():
            assert st.healthy, st
        apicurio = JarResolver.from_settings(s).apicurio.version
        assert statuses["schema-registry"].version == f"Apicurio {apicurio}"
        assert statuses["kafka"].version.startswith("4.")
        assert statuses["kafka"].address == f"127.0.0.1:{s.kafka_port}"

        # Every socket of every process of this stack listens on loopback, on the ports it
        # was given (the registry's management interface on a port the kernel picked).
        own = {st.name: st.pid for st in statuses.values() if st.pid is not None}
        assert set(own) == {"kafka", "schema-registry", "redis"}
        pids[str(s.data_dir)] = list(own.values())
        ports: set[int] = set()
        for name, pid in own.items():
            assert pid is not None
            listening = _listening(pid)
            assert listening, name
            assert {addr for addr, _ in listening} <= _LOOPBACK, (name, listening)
            ports |= {port for _, port in listening}
        assert {s.kafka_port, s.kafka_controller_port, s.registry_port, s.redis_port} <= ports
        assert 9000 not in ports  # Quarkus' default management port stays free for others

        # A record through this broker.
        conf = {"bootstrap.servers": s.bootstrap_servers}
        topic = f"side-{uuid.uuid4().hex[:6]}"
        admin = AdminClient(conf)  # kept alive until the topic exists
        admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
        producer = Producer(conf)
        producer.produce(topic, key=b"k", value=str(s.data_dir).encode())
        assert producer.flush(30) == 0
        consumer = Consumer({**conf, "group.id": f"g-{topic}", "enable.auto.commit": False})
        consumer.assign([TopicPartition(topic, 0, 0)])
        msg = consumer.poll(30)
        consumer.close()
        assert msg is not None and msg.error() is None
        assert msg.value() == str(s.data_dir).encode()

    # A schema on each registry; neither sees the other's subject.
    subjects = {}
    for stack, name in ((a, "OnlyA"), (b, "OnlyB")):
        client = SchemaRegistryClient({"url": stack.s.registry_url, "timeout": 30})
        subject = f"{name.lower()}-value"
        schema = f'{{"type":"record","name":"{name}","fields":[{{"name":"x","type":"int"}}]}}'
        schema_id = client.register_schema(subject, Schema(schema, "AVRO"))
        assert f'"{name}"' in client.get_schema(schema_id).schema_str
        subjects[stack] = (client, subject)
    (client_a, subject_a), (client_b, subject_b) = subjects[a], subjects[b]
    assert subject_a in client_a.get_subjects() and subject_b not in client_a.get_subjects()
    assert subject_b in client_b.get_subjects() and subject_a not in client_b.get_subjects()

    # Down, one after the other: the second is untouched by the first going down.
    assert sorted(a.down()) == ["kafka", "redis", "registry"]
    assert all(st.healthy for st in b.status() if st.name != "clickhouse")
    assert sorted(b.down()) == ["kafka", "redis", "registry"]
    for stack in two_stacks:
        s = stack.s
        for pid in pids[str(s.data_dir)]:
            assert not process.cmdline(pid), f"pid {pid} is still running"
        for port in (s.kafka_port, s.kafka_controller_port, s.registry_port, s.redis_port):
            assert process.port_is_free(port), port
        assert not list((s.data_dir / "run").glob("*.pid"))
