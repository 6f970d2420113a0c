"""Bad input never stops Stormline: poison on every input topic, wrong settings, bad files.

Poison records go to every topic a service reads while the whole loop runs; each becomes a
dead letter with its reason, and every task published around them still gets its outcome.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer

from stormline.schemas.catalog import (
    ASSIGNMENTS,
    CHECKPOINTS,
    DEAD_LETTERS,
    HEARTBEATS,
    REWARDS,
    TASKS,
    TRAJECTORIES,
)
from stormline.schemas.kafka import EventConsumer
from stormline.settings import Settings
from tests.conftest import settings_env
from tests.loop import Loop

INPUTS = (TASKS, ASSIGNMENTS, TRAJECTORIES, REWARDS, HEARTBEATS, CHECKPOINTS)


@pytest.mark.faults
@pytest.mark.timeout(420)
def test_poison_on_every_input_topic_is_dead_lettered_and_nothing_stops(
    stack_settings: Settings, tmp_path: Path
) -> None:
    # A record limit below the broker's own (1 MiB) so that an oversize record can be produced.
    base = stack_settings.model_copy(update={"max_record_bytes": 200_000})
    with Loop(base, tmp_path, sink=True) as loop:
        s = loop.s
        raw = Producer({"bootstrap.servers": s.bootstrap_servers})
        poison = {spec.logical: os.urandom(40) for spec in INPUTS}
        loop.publish(60)
        for spec in INPUTS:
            raw.produce(spec.name(s), key=f"poison-{spec.logical}", value=poison[spec.logical])
        big = b"\x00" + b"\x01" * (s.max_record_bytes + 10)
        raw.produce(TASKS.name(s), key="poison-oversize", value=big)
        assert raw.flush(10) == 0
        loop.publish(60, seed=9)
        out = loop.wait_outcomes(timeout=240)
        assert not out.missing({t.task_id for t in loop.tasks})

        reader = EventConsumer(
            s, loop.serde, f"{s.topic_prefix}dl-{uuid.uuid4().hex[:4]}", [DEAD_LETTERS]
        )
        letters = []
        deadline = time.monotonic() + 60
        want = {spec.name(s) for spec in INPUTS}
        while time.monotonic() < deadline:
            letters += [r.event for r in reader.poll_batch(500, 1.0)]
            if want <= {dl.source_topic for dl in letters}:
                break
        reader.close()
        by_topic = {dl.source_topic for dl in letters}
        assert want <= by_topic, f"no dead letter for {sorted(want - by_topic)}"
        assert all(dl.error and dl.error_kind for dl in letters)
        assert any(dl.error_kind == "oversize" for dl in letters)


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stormline.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_unreachable_bootstrap_server_is_a_clear_error(settings: Settings) -> None:
    env = {**settings_env(settings), "STORMLINE_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    out = _cli(["topics", "list"], env)
    assert out.returncode == 3  # infrastructure unreachable
    flat = " ".join(out.stderr.split())
    assert "127.0.0.1:1" in flat and "STORMLINE_KAFKA_BOOTSTRAP_SERVERS" in flat


def test_bad_registry_url_is_a_clear_error(settings: Settings) -> None:
    env = {**settings_env(settings), "STORMLINE_SCHEMA_REGISTRY_URL": "http://127.0.0.1:9/nope"}
    out = _cli(["schemas", "register"], env)
    assert out.returncode == 3  # infrastructure unreachable
    assert "STORMLINE_SCHEMA_REGISTRY_URL" in " ".join(out.stderr.split())


def test_invalid_settings_value_is_a_clear_error(settings: Settings) -> None:
    env = {**settings_env(settings), "STORMLINE_TOPIC_PREFIX": "bad prefix!"}
    out = _cli(["topics", "list"], env)
    assert out.returncode == 2
    assert "topic_prefix" in out.stderr
