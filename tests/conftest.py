"""Test fixtures: one real stack per test run, one topic prefix per test.

By default pytest starts the embedded stack (Kafka, Apicurio, redis-server) on free
loopback ports in a temporary data directory, and stops it at the end. To run against a
stack that is already up, name it in the environment as usual
(STORMLINE_KAFKA_BOOTSTRAP_SERVERS, STORMLINE_SCHEMA_REGISTRY_URL, STORMLINE_REDIS_URL).
"""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from stormline.deploy.stack import EmbeddedStack
from stormline.settings import Settings

_HANDED_OUT: set[int] = set()
T = TypeVar("T")


def free_port() -> int:
    """A loopback port nobody listens on, never the same one twice in this test run (the
    kernel may hand a just-closed port out again, e.g. Kafka's and its controller's)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_http(url: str, seconds: float = 60.0) -> None:
    """Wait until ``url`` answers at all (a server the test started is listening)."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {seconds:.0f}s")


def wait_until(
    predicate: Callable[[], T], timeout: float = 30.0, what: str = "", interval: float = 0.1
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    The way to check that something did *not* happen: wait for a positive sign that the
    system processed past the point in question, then assert; never sleep and hope.
    """
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:.0f}s for {what or predicate}; last: {got!r}")
        time.sleep(interval)


def uncommitted(settings: Settings, group: str, topics: Iterable[str]) -> dict[str, int]:
    """Records of ``topics`` that consumer ``group`` has not committed yet, per partition
    ("topic:partition" -> count); empty once the group has processed up to every end offset."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": group,
            "enable.auto.commit": False,
        }
    )
    try:
        md = c.list_topics(timeout=10)
        tps = [TopicPartition(t, p) for t in topics for p in md.topics[t].partitions]
        behind: dict[str, int] = {}
        for tp in c.committed(tps, timeout=10):
            low, high = c.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
            done = tp.offset if tp.offset >= 0 else low
            if done < high:
                behind[f"{tp.topic}:{tp.partition}"] = high - done
        return behind
    finally:
        c.close()


def wait_router_caught_up(settings: Settings, timeout: float = 60) -> None:
    """Until the router's group has committed every record of its inputs (tasks,
    trajectories, rewards): everything sent so far is processed."""
    from stormline.schemas.catalog import REWARDS, TASKS, TRAJECTORIES
    from stormline.streams.kafka import app_id

    topics = [spec.name(settings) for spec in (TASKS, TRAJECTORIES, REWARDS)]
    wait_until(
        lambda: not uncommitted(settings, app_id(settings), topics),
        timeout=timeout,
        interval=0.5,
        what="the router to commit every record of " + ", ".join(topics),
    )


@pytest.fixture(scope="session")
def stack_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    if os.environ.get("STORMLINE_KAFKA_BOOTSTRAP_SERVERS"):
        yield Settings(data_dir=tmp_path_factory.mktemp("data"))
        return
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("stack"),
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        registry_port=free_port(),
        redis_port=free_port(),
    )
    stack = EmbeddedStack(settings)
    try:
        stack.up()
        # Pin the addresses so that everything below treats the stack as external.
        yield settings.model_copy(
            update={
                "kafka_bootstrap_servers": settings.bootstrap_servers,
                "schema_registry_url": settings.registry_url,
                "redis_url": settings.redis_address,
            }
        )
    finally:
        stack.down()


@pytest.fixture
def settings(stack_settings: Settings, tmp_path: Path) -> Settings:
    """The shared stack, with this test's own topic prefix and data directory."""
    return stack_settings.model_copy(
        update={"topic_prefix": f"t{uuid.uuid4().hex[:8]}.", "data_dir": tmp_path}
    )


@pytest.fixture
def topics(settings: Settings) -> Settings:
    """``settings`` with every catalog topic created under this test's prefix."""
    from stormline.schemas.kafka import ensure_topics

    ensure_topics(settings)
    return settings


@pytest.fixture
def serde(settings: Settings):  # type: ignore[no-untyped-def]
    from stormline.schemas.serde import Serde

    return Serde.from_settings(settings)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a subprocess see ``settings`` (the supervisor's own mapping)."""
    from stormline.deploy.supervisor import settings_environ

    env = {k: v for k, v in os.environ.items() if not k.startswith("STORMLINE_")}
    return {**env, **settings_environ(settings)}


# The test process loads native engines in-process (chDB, Ray, torch). Once every result is
# reported, one of them has crashed the interpreter's own teardown (exit 139) on this
# machine, turning a green run red. Leave with pytest's own exit status instead.
_EXIT: dict[str, int] = {}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if "status" in _EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT["status"])
