"""Fault tests: break the real loop mid-load and check that nothing is lost or done twice.

Each test runs the whole loop as processes (simulated LLM, router, workers, evaluator, and
where it matters sink and trainer) against a private broker and Redis, so that restarting
them disturbs no other test. Each ends by checking that every published task has exactly
one final outcome, and counts the LLM calls that were made more than once.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from stormline.deploy import process
from stormline.deploy.stack import EmbeddedStack
from stormline.schemas.catalog import REWARDS
from stormline.schemas.kafka import end_offsets
from stormline.settings import Settings
from stormline.state import task_status
from tests.conftest import free_port
from tests.loop import Loop, Outcomes

pytestmark = [pytest.mark.faults, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def private(
    stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[EmbeddedStack, Settings]]:
    """A broker and a Redis of this module's own (the registry is the shared one)."""
    s = stack_settings.model_copy(
        update={
            "data_dir": tmp_path_factory.mktemp("faults-stack"),
            "kafka_bootstrap_servers": None,
            "redis_url": None,
            "kafka_port": free_port(),
            "kafka_controller_port": free_port(),
            "redis_port": free_port(),
        }
    )
    stack = EmbeddedStack(s)
    stack.up()
    yield stack, s
    stack.down()


def check(loop: Loop, out: Outcomes, what: str) -> int:
    wanted = {t.task_id for t in loop.tasks}
    missing = out.missing(wanted)
    assert not missing, (
        f"{what}: {len(missing)} tasks have no outcome: {_whereabouts(loop, out, missing)}"
    )
    several = [t for t in wanted if out.final_outcomes(t) != 1]
    assert not several, f"{what}: tasks with more than one final outcome: {several[:3]}"
    assert not out.conflicting_attempts(), f"{what}: attempts done twice"
    dup = loop.duplicate_llm_calls(out)
    print(f"{what}: {len(wanted)} tasks, each with one final outcome; {dup} LLM calls repeated")
    return dup


def _whereabouts(loop: Loop, out: Outcomes, missing: set[str]) -> dict[str, object]:
    """Where each of the first missing tasks got to: its Redis status and its trajectories;
    printed with the router's counters and the end of every service's log."""
    try:
        url = f"http://127.0.0.1:{loop.s.router_web_port}/router/counters/"
        print("router counters:", httpx.get(url, timeout=5).text)
    except httpx.HTTPError as exc:
        print("router counters: not answered:", exc)
    for log in sorted((loop.s.data_dir / "logs").glob("*.log")):
        print(f"--- {log.name}, last lines:", *log.read_text().splitlines()[-8:], sep="\n")
    return {
        t: {
            "status": task_status(loop.s, t),
            "trajectories": [(tr.attempt, str(tr.status)) for tr in out.trajectories.get(t, [])],
        }
        for t in sorted(missing)[:5]
    }


def test_kill9_worker_router_and_evaluator_mid_load(private, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, s = private
    with Loop(s, tmp_path) as loop:
        loop.publish(300)
        loop.wait_flowing()
        loop.kill9("worker-0")
        loop.publish(150, seed=2)
        time.sleep(2)
        loop.kill9("router")
        time.sleep(2)
        loop.kill9("evaluator")
        out = loop.wait_outcomes(timeout=240)
        dup = check(loop, out, "kill -9 worker, router, evaluator")
        # Only calls in flight at the moment of the kill may be repeated (their result was
        # never recorded); finished work is re-sent from Redis without a call.
        assert dup <= 64 * 3


def test_llm_errors_for_a_stretch(private, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, s = private
    with Loop(s, tmp_path) as loop:
        loop.publish(100)
        loop.wait_flowing()
        for kind in ("429", "500", "hang"):
            r = httpx.post(
                f"{loop.sim_url}/admin/faults", json={"kind": kind, "seconds": 2}, timeout=5
            )
            assert r.status_code < 300, r.text
            loop.publish(50, seed=hash(kind) % 1000)
            time.sleep(2.5)
        out = loop.wait_outcomes(timeout=240)
        check(loop, out, "LLM 429/500/timeouts")
        statuses = {tr.status for trs in out.trajectories.values() for tr in trs}
        assert "ok" in {str(x) for x in statuses}


def test_redis_down_for_a_stretch(private, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack, s = private
    with Loop(s, tmp_path) as loop:
        loop.publish(200)
        loop.wait_flowing()
        pid = int((s.data_dir / "run" / "redis.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        loop.publish(100, seed=5)
        time.sleep(4)
        stack.up()  # redis comes back with its append-only file
        out = loop.wait_outcomes(timeout=240)
        check(loop, out, "Redis down")


def test_broker_restart_mid_load(private, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stack, s = private
    with Loop(s, tmp_path) as loop:
        loop.publish(200)
        loop.wait_flowing()
        pid = int((s.data_dir / "run" / "kafka.pid").read_text())
        process.stop_pid(pid, "kafka.Kafka", timeout=60)
        time.sleep(2)
        stack.up()
        loop.publish(100, seed=6)
        out = loop.wait_outcomes(timeout=300)
        check(loop, out, "broker restart")


def test_kill9_sink_and_trainer_and_clickhouse_down(private, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from stormline.consumers.sink.store import open_store, parts_dir

    _, s = private
    with Loop(s, tmp_path, sink=True, trainer=True) as loop:
        loop.publish(300)
        loop.wait_flowing()
        loop.kill9("sink")
        loop.kill9("trainer")
        # ClickHouse (the sink's storage) unavailable for a stretch: its directory is
        # replaced by a file, so every write fails until it is put back.
        parts = parts_dir(loop.s)
        parts.mkdir(parents=True, exist_ok=True)
        aside = parts.with_name(parts.name + ".away")
        shutil.move(parts, aside)
        parts.write_text("storage is down")
        loop.publish(100, seed=7)
        time.sleep(4)
        parts.unlink()
        shutil.move(aside, parts)
        out = loop.wait_outcomes(timeout=300)
        check(loop, out, "kill -9 sink and trainer, ClickHouse down")
        # Exactly once into ClickHouse: one row per event on the topic, none twice. A re-sent
        # copy of an event (same event id, a later offset: a worker re-sending its recorded
        # trajectory, so the evaluator scores it again) is on the topic twice and in the
        # table once (the sink's write-time de-duplication).
        on_topic = {str(r.event_id) for rs in out.rewards.values() for r in rs}
        records = sum(end_offsets(loop.s, REWARDS.name(loop.s), loop.s.default_partitions))
        assert records >= len(on_topic)
        store = open_store(loop.s)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                n = int(store.query("SELECT count() FROM rewards").rows[0][0])
                if n >= len(on_topic):
                    break
                loop.sup.tick()
                time.sleep(1)
            offsets = int(
                store.query("SELECT uniqExact(topic, partition, offset) FROM rewards").rows[0][0]
            )
            stored = {str(r[0]) for r in store.query("SELECT event_id FROM rewards").rows}
        finally:
            store.close()
        print(f"sink: {n} rows for {records} records, {len(on_topic)} event ids on the topic")
        assert n == offsets == len(stored) == len(on_topic), (
            f"sink: {n} rows, {offsets} offsets, {len(stored)} event ids; "
            f"topic: {records} records, {len(on_topic)} event ids"
        )
        assert stored == on_topic, f"event ids not stored: {sorted(on_topic - stored)[:3]}"
        # The supervisor restarts a killed service after a back-off; give it that long.
        deadline = time.monotonic() + 60
        while "trainer" not in loop.sup.pids() and time.monotonic() < deadline:
            loop.sup.tick()
            time.sleep(0.5)
        assert "trainer" in loop.sup.pids(), "the trainer was not restarted"
