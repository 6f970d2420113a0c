"""The runtime kernel, pure parts: one connection config, one murmur2, one retry policy.

No broker needed: configs are built, not connected; the retry policy runs on plain calls.
"""

from __future__ import annotations

import ssl
import time
from typing import Any

import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from stormline.runtime.commits import OffsetTracker, commit_tracked
from stormline.runtime.connection import KafkaConnection, broker_credentials, confluent_config
from stormline.runtime.partitioning import murmur2, partition_for
from stormline.runtime.retry import RetryPolicy
from stormline.schemas.kafka import dead_letter
from stormline.settings import Settings

SECURE = {
    "kafka_bootstrap_servers": "b1:9093,b2:9093",
    "kafka_sasl_mechanism": "scram-sha-512",
    "kafka_sasl_username": "svc",
    "kafka_sasl_password": "s3cret",
}


def _settings(protocol: str | None, **kw: Any) -> Settings:
    return Settings(kafka_security_protocol=protocol, **{**SECURE, **kw})  # type: ignore[arg-type]


# ------------------------------------------------------------------- connection config --
@pytest.mark.parametrize("protocol", [None, "PLAINTEXT", "SSL", "SASL_PLAINTEXT", "sasl_ssl"])
def test_confluent_and_aiokafka_configs_come_from_the_same_settings(protocol: str | None) -> None:
    s = _settings(protocol)
    conn = KafkaConnection.from_settings(s)
    conf = confluent_config(s)
    aio = conn.aiokafka()
    expect = (protocol or "PLAINTEXT").upper()

    assert conf["bootstrap.servers"] == aio["bootstrap_servers"] == "b1:9093,b2:9093"
    assert conf.get("security.protocol", "PLAINTEXT") == aio["security_protocol"] == expect
    sasl = expect.startswith("SASL_")
    tls = expect in ("SSL", "SASL_SSL")
    if sasl:
        assert conf["sasl.mechanism"] == aio["sasl_mechanism"] == "SCRAM-SHA-512"
        assert conf["sasl.username"] == aio["sasl_plain_username"] == "svc"
        assert conf["sasl.password"] == aio["sasl_plain_password"] == "s3cret"
    else:
        assert not any(k.startswith("sasl.") for k in conf)
        assert not any(k.startswith("sasl_") for k in aio)
    assert isinstance(aio.get("ssl_context"), ssl.SSLContext) is tls

    # Faust gets exactly what a plain aiokafka client gets.
    creds = broker_credentials(s)
    faust_auth = (
        credentials_to_aiokafka_auth(creds) if creds else {"security_protocol": "PLAINTEXT"}
    )
    plain = {k: v for k, v in aio.items() if k not in ("bootstrap_servers", "ssl_context")}
    assert {k: v for k, v in faust_auth.items() if k != "ssl_context"} == plain
    assert (faust_auth.get("ssl_context") is not None) is tls


def test_sasl_without_a_mechanism_is_plain_for_every_client() -> None:
    s = Settings(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="u")
    assert confluent_config(s)["sasl.mechanism"] == "PLAIN"  # librdkafka alone says GSSAPI
    assert KafkaConnection.from_settings(s).aiokafka()["sasl_mechanism"] == "PLAIN"


def test_ca_file_reaches_both_clients(tmp_path: Any) -> None:
    ca = ssl.get_default_verify_paths().cafile or ssl.get_default_verify_paths().openssl_cafile
    if not ca:
        pytest.skip("no system CA bundle to stand in for a cluster CA")
    s = Settings(kafka_security_protocol="SSL", kafka_ssl_ca_location=ca)
    assert confluent_config(s)["ssl.ca.location"] == ca
    ctx = KafkaConnection.from_settings(s).aiokafka()["ssl_context"]
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.cert_store_stats()["x509_ca"] > 0


def test_overrides_go_on_top_and_secrets_stay_out_of_reprs() -> None:
    s = _settings("SASL_SSL")
    assert confluent_config(s, **{"group.id": "g"})["group.id"] == "g"
    assert "s3cret" not in repr(KafkaConnection.from_settings(s))


def test_unknown_protocol_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="STORMLINE_KAFKA_SECURITY_PROTOCOL"):
        confluent_config(Settings(kafka_security_protocol="TLS"))


# ------------------------------------------------------------------------------ murmur2 --
# Java's org.apache.kafka.common.utils.Utils.murmur2 (UtilsTest), as signed 32-bit ints.
JAVA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize(("key", "java"), JAVA_MURMUR2.items())
def test_murmur2_is_the_java_clients(key: bytes, java: int) -> None:
    assert murmur2(key) == java & 0xFFFFFFFF


@pytest.mark.parametrize("key", [k.decode() for k in JAVA_MURMUR2])
def test_partition_is_librdkafka_murmur2_random(key: str) -> None:
    # librdkafka's murmur2_random and Java's default partitioner: positive hash mod n.
    for n in (1, 3, 4, 12, 100):
        expect = (JAVA_MURMUR2[key.encode()] & 0x7FFFFFFF) % n
        assert partition_for(key, n) == partition_for(key.encode(), n) == expect


def test_crc32_partitioner_for_plain_librdkafka_clients() -> None:
    import zlib

    assert partition_for("task-1", 7, "consistent_random") == zlib.crc32(b"task-1") % 7
    with pytest.raises(ValueError, match="unsupported partitioner"):
        partition_for("k", 3, "sticky")


# ------------------------------------------------------------------------- retry policy --
class Flaky:
    def __init__(self, fails: int, exc: type[Exception] = ConnectionError) -> None:
        self.fails, self.calls, self.exc = fails, 0, exc

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.fails:
            raise self.exc(f"failure {self.calls}")
        return "ok"


def _run(policy: RetryPolicy, fn: Flaky, retry_on: Any = None, **kw: Any) -> str:
    on = retry_on or (lambda e: isinstance(e, ConnectionError))
    for attempt in policy.retrying(on, **kw):
        with attempt:
            return fn()
    raise AssertionError("unreachable")


def test_bounded_policy_gives_up_after_its_attempts_with_the_last_error() -> None:
    fn = Flaky(fails=10)
    with pytest.raises(ConnectionError, match="failure 3"):
        _run(RetryPolicy(base_s=0.001, max_s=0.002, attempts=3), fn)
    assert fn.calls == 3


def test_bounded_by_time() -> None:
    fn = Flaky(fails=10_000)
    start = time.monotonic()
    with pytest.raises(ConnectionError):
        _run(RetryPolicy(base_s=0.01, max_s=0.02, deadline_s=0.2), fn)
    assert 0.15 < time.monotonic() - start < 2.0 and fn.calls > 3


def test_unbounded_policy_retries_until_success() -> None:
    fn = Flaky(fails=25)
    assert _run(RetryPolicy(base_s=0.0005, max_s=0.001), fn) == "ok"
    assert fn.calls == 26


def test_only_what_retry_on_names_is_retried() -> None:
    fn = Flaky(fails=5, exc=ValueError)
    with pytest.raises(ValueError, match="failure 1"):
        _run(RetryPolicy(base_s=0.001), fn)
    assert fn.calls == 1


def test_waits_use_the_given_sleep_and_stay_under_the_ceiling() -> None:
    slept: list[float] = []
    fn = Flaky(fails=6)
    assert _run(RetryPolicy(base_s=0.1, max_s=0.4), fn, sleep=slept.append) == "ok"
    ceilings = [0.1, 0.2, 0.4, 0.4, 0.4, 0.4]
    assert len(slept) == 6 and all(0 <= d <= c for d, c in zip(slept, ceilings, strict=True))


def test_async_retrying_is_the_same_policy() -> None:
    import asyncio

    fn = Flaky(fails=2)

    async def main() -> str:
        policy = RetryPolicy(base_s=0.001, max_s=0.002, attempts=3)
        async for attempt in policy.async_retrying(lambda e: isinstance(e, ConnectionError)):
            with attempt:
                return fn()
        raise AssertionError("unreachable")

    assert asyncio.run(main()) == "ok" and fn.calls == 3


# ------------------------------------------------------------------------------ commits --
class FakeConsumer:
    def __init__(self, error: Exception | None = None) -> None:
        self.error, self.commits = error, []  # type: ignore[var-annotated]

    def commit(self, offsets: list[Any], asynchronous: bool) -> None:
        assert not asynchronous
        if self.error is not None:
            raise self.error
        self.commits.append({(tp.topic, tp.partition): tp.offset for tp in offsets})


def test_commit_tracked_commits_polled_positions_once() -> None:
    tracker, consumer = OffsetTracker(), FakeConsumer()
    tracker.polled(("t", 0), 5)
    tracker.polled(("t", 1), 2)
    commit_tracked(consumer, tracker)
    assert consumer.commits == [{("t", 0): 5, ("t", 1): 2}]
    assert commit_tracked(consumer, tracker) is None  # nothing new
    tracker.forget()
    assert tracker.committable() == {}


def test_commit_tracked_keeps_positions_while_the_coordinator_is_away() -> None:
    from confluent_kafka import KafkaError, KafkaException

    tracker = OffsetTracker()
    tracker.polled(("t", 0), 5)
    away = FakeConsumer(KafkaException(KafkaError(KafkaError._WAIT_COORD)))
    commit_tracked(away, tracker)
    assert tracker.committable() == {("t", 0): 5}  # carried by the next commit
    rebalanced = FakeConsumer(KafkaException(KafkaError(KafkaError.ILLEGAL_GENERATION)))
    commit_tracked(rebalanced, tracker)
    assert tracker.committable() == {}  # the new owner re-reads
    tracker.polled(("t", 0), 6)
    with pytest.raises(KafkaException):
        commit_tracked(FakeConsumer(KafkaException(KafkaError(KafkaError.INVALID_CONFIG))), tracker)


# ------------------------------------------------------------------------- dead letters --
def test_dead_letter_keeps_half_the_record_limit_and_says_so() -> None:
    s = Settings(max_record_bytes=1000)
    common = {"partition": 1, "offset": 7, "key": b"k", "kind": "oversize", "group": "g"}
    letter = dead_letter(s, topic="tasks", value=b"x" * 5000, error="too big", **common)
    assert letter is not None
    assert letter.raw_value == b"x" * 500 and "first 500 of 5000 bytes" in letter.error
    small = dead_letter(s, topic="tasks", value=b"ab", error="bad", **common)
    assert small is not None and small.raw_value == b"ab" and small.error == "bad"
    assert dead_letter(s, topic="dead-letters", value=b"ab", error="bad", **common) is None


# ---------------------------------------------------------------------- replication --
def test_replication_follows_the_cluster_unless_set() -> None:
    from stormline.runtime.admin import replication_for

    s = Settings()
    assert (replication_for(s, 1).factor, replication_for(s, 1).min_insync) == (1, 1)
    assert (replication_for(s, 3).factor, replication_for(s, 3).min_insync) == (3, 2)
    assert (replication_for(s, 5).factor, replication_for(s, 5).min_insync) == (3, 2)
    assert replication_for(s, 3).topic_config() == {"min.insync.replicas": "2"}
    two = Settings(replication_factor=2)
    assert (replication_for(two, 3).factor, replication_for(two, 3).min_insync) == (2, 1)
    with pytest.raises(ValueError, match="exceeds the replication factor"):
        replication_for(Settings(replication_factor=2, min_insync_replicas=3), 3)


def test_bootstrap_lists_every_embedded_node() -> None:
    one = Settings(kafka_port=19092, kafka_controller_port=19093)
    assert one.bootstrap_servers == "127.0.0.1:19092"
    three = Settings(
        kafka_brokers=3, kafka_port=19092, kafka_controller_port=19093, kafka_node_ports=[19200]
    )
    assert three.kafka_nodes() == [(19092, 19093), (19200, 19095), (19096, 19097)]
    assert three.bootstrap_servers == "127.0.0.1:19092,127.0.0.1:19200,127.0.0.1:19096"
    assert Settings(kafka_brokers=3, kafka_bootstrap_servers="b:9092").bootstrap_servers == "b:9092"
