"""The router's crash and outage windows that the chaos run found (issue 15).

* A status the router decided while Redis was away is written once Redis is back (it was
  dropped: the task stayed ``running`` or had no status at all).
* A kill between the final failure's Trajectory and its Reward: the restarted router sends
  the missing Reward (it was never sent: a task without an outcome).
* A kill after the task's record reached its changelog and before its TaskAssigned was sent:
  the restarted router sends that assignment (it waited for the attempt to expire, counted the
  expiry against an agent that never saw the task, and only then assigned attempt 2).

The kills are real SIGKILLs of a router process at a chosen point (``tests/router_crash.py``).
This module starts a stack of its own (broker, registry, Redis on free ports), because it stops
Redis. The pure parts (the records' marks, the status queue) are tested here too.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stormline.deploy import process
from stormline.deploy.stack import EmbeddedStack
from stormline.schemas.catalog import TASKS
from stormline.schemas.kafka import ensure_topics
from stormline.schemas.lifecycle import TaskState
from stormline.schemas.models import (
    ROUTER_AGENT,
    AgentHealthChanged,
    Reward,
    TaskAssigned,
    Trajectory,
)
from stormline.settings import Settings
from stormline.state import task_status
from stormline.streams.status import status_of
from tests.conftest import free_port, uncommitted, wait_router_caught_up, wait_until
from tests.test_router import Bus, RouterProcess, _wait_view, task

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]


class CrashingRouter(RouterProcess):
    """A router that SIGKILLs itself in ``window`` (see tests/router_crash.py)."""

    def __init__(self, settings: Settings, log: Path, window: str, **env: str) -> None:
        super().__init__(settings, log, **env)
        self.window = window

    def start(self) -> RouterProcess:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.router_crash", self.window],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parent.parent,
        )
        return self

    def died(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedStack, Settings]]:
    s = Settings(
        data_dir=tmp_path_factory.mktemp("windows-stack"),
        kafka_bootstrap_servers=None,
        schema_registry_url=None,
        redis_url=None,
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        registry_port=free_port(),
        redis_port=free_port(),
    )
    stack = EmbeddedStack(s)
    stack.up()
    try:
        yield stack, s
    finally:
        stack.down()


@pytest.fixture
def ws(own_stack: tuple[EmbeddedStack, Settings], tmp_path: Path) -> Settings:
    _, base = own_stack
    s = base.model_copy(
        update={
            "topic_prefix": f"w{uuid.uuid4().hex[:8]}.",
            "data_dir": tmp_path,
            "router_web_port": free_port(),
            "kafka_bootstrap_servers": base.bootstrap_servers,
            "schema_registry_url": base.registry_url,
            "redis_url": base.redis_address,
        }
    )
    ensure_topics(s)
    return s


def _whereabouts(s: Settings, r: RouterProcess, log: Path) -> str:
    """The router's counters, its group's uncommitted task records, the end of its log."""
    from stormline.streams.kafka import app_id

    try:
        counters = r.view("counters", timeout=5)
    except (AssertionError, httpx.HTTPError) as exc:
        counters = f"not answered ({exc})"
    behind = uncommitted(s, app_id(s), [TASKS.name(s)])
    return f"counters {counters}; uncommitted task records {behind}; log: {log.read_text()[-3000:]}"


def _state(s: Settings, task_id: str) -> str | None:
    return (task_status(s, task_id) or {}).get("state")


def test_statuses_decided_while_redis_is_down_are_written_when_it_is_back(
    own_stack: tuple[EmbeddedStack, Settings], ws: Settings, tmp_path: Path
) -> None:
    stack, base = own_stack
    r = RouterProcess(ws, tmp_path / "router.log").start()
    b = Bus(ws)
    try:
        b.beating["rd-a"] = ["rd"]
        b.answer["rd-a"] = lambda a: 1.0
        b.wait(AgentHealthChanged, lambda e: e.agent_id == "rd-a", timeout=60)
        b.submit(task("rd-warm", "rd", ["rd"]))
        wait_until(lambda: _state(ws, "rd-warm") == "succeeded", 60, "rd-warm succeeded")

        pid = int((Path(base.data_dir) / "run" / "redis.pid").read_text())
        process.stop_pid(pid, "redis-server", timeout=30)  # the Redis this module started
        b.submit(task("rd-ok", "rd", ["rd"]), task("rd-none", "rd", ["nobody"], deadline_ms=1500))
        # The router decided both (its Reward for rd-none is its final failure) meanwhile.
        b.wait(Reward, lambda e: e.task_id == "rd-ok", timeout=60)
        b.wait(Reward, lambda e: e.task_id == "rd-none" and e.agent_id == ROUTER_AGENT, timeout=60)
        time.sleep(3)  # a few of the router's retries fail against a Redis that is away
        stack.up()  # Redis again (broker and registry are reused)
        wait_until(lambda: _state(ws, "rd-ok") == "succeeded", 60, "rd-ok succeeded in Redis")
        wait_until(lambda: _state(ws, "rd-none") == "failed", 60, "rd-none failed in Redis")
        assert (task_status(ws, "rd-none") or {}).get("error") == "no capable healthy agent"
        counters = r.view("counters")
        assert counters["status_pending"] == 0 and counters["status_retried"] >= 1, counters
    finally:
        b.close()
        r.stop()


def test_a_kill_between_the_final_trajectory_and_its_reward_sends_the_reward(
    ws: Settings, tmp_path: Path
) -> None:
    log = tmp_path / "router.log"
    crash = CrashingRouter(ws, log, "between-final-events").start()
    b = Bus(ws)
    r = RouterProcess(ws, log)
    try:
        b.submit(task("fin-1", "fin", ["nobody"], deadline_ms=1500))
        b.wait(Trajectory, lambda e: e.task_id == "fin-1", timeout=120)
        wait_until(crash.died, 30, "the crashing router to kill itself")
        assert "router_crash: SIGKILL" in log.read_text()
        assert not b.of(Reward, lambda e: e.task_id == "fin-1")  # the window: no Reward yet
        r.start()
        (rw,) = b.wait(Reward, lambda e: e.task_id == "fin-1", timeout=60)
        assert rw.agent_id == ROUTER_AGENT and rw.trajectory_id == "fin-1:router-final"
        wait_until(lambda: _state(ws, "fin-1") == "failed", 30, "fin-1 failed in Redis")
        time.sleep(3)  # a second copy, if any, has had time to arrive: same event ids only
        trs = b.of(Trajectory, lambda e: e.task_id == "fin-1")
        rws = b.of(Reward, lambda e: e.task_id == "fin-1")
        assert {t.event_id for t in trs} == {trs[0].event_id}
        assert {x.event_id for x in rws} == {rw.event_id}
    finally:
        b.close()
        r.stop()
        crash.stop()


def test_a_kill_before_the_assignment_is_sent_sends_it_after_the_restart(
    ws: Settings, tmp_path: Path
) -> None:
    log = tmp_path / "router.log"
    # Long attempts: the assignment must come from the restart, not from an expiry.
    env = {"STORMLINE_ROUTER_ASSIGNMENT_TTL_S": "120"}
    crash = CrashingRouter(ws, log, "before-assignment", **env).start()
    b = Bus(ws)
    r = RouterProcess(ws, log, **env)
    try:
        b.beating["as-a"] = ["as"]
        b.wait(AgentHealthChanged, lambda e: e.agent_id == "as-a", timeout=120)
        b.submit(task("as-1", "as", ["as"]))
        wait_until(crash.died, 60, "the crashing router to kill itself")
        assert not b.of(TaskAssigned, lambda e: e.task_id == "as-1")  # the window
        b.answer["as-a"] = lambda a: 1.0
        r.start()
        (a,) = b.wait(TaskAssigned, lambda e: e.task_id == "as-1", timeout=60)
        assert (a.attempt, a.agent_id) == (1, "as-a")
        wait_until(lambda: _state(ws, "as-1") == "succeeded", 30, "as-1 succeeded")
        # The status is written before the reward's observation reaches the statistics (a
        # hop of its own), so wait for the observation; then nothing more may arrive.
        _wait_view(r, lambda v: "as-a" in v.get("as", {}))
        wait_router_caught_up(ws)
        # The agent is not blamed for an attempt it never saw: one observation, a success.
        counters = r.view("counters")
        assert counters["expiries_counted"] == 0, counters
        cell = r.view("qtable")["as"]["as-a"]
        assert cell["count"] == 1 and cell["value"] == 1.0, cell
    finally:
        b.close()
        r.stop()
        crash.stop()


@pytest.mark.parametrize(
    "window", ["stop-before-decisions", "stop-in-finish"], ids=["undecided", "decided"]
)
def test_a_stop_with_a_batch_in_hand_leaves_it_to_the_next_start(
    ws: Settings, tmp_path: Path, window: str
) -> None:
    log = tmp_path / "router.log"
    stopping = CrashingRouter(ws, log, window).start()
    b = Bus(ws)
    r = RouterProcess(ws, log)
    try:
        b.beating["st-a"] = ["st"]
        b.answer["st-a"] = lambda a: 1.0
        b.wait(AgentHealthChanged, lambda e: e.agent_id == "st-a", timeout=120)
        b.submit(task("stop-1", "st", ["st"]))
        wait_until(stopping.died, 60, "the router to stop itself")
        assert stopping.proc is not None
        assert stopping.proc.returncode == 0, log.read_text()[-3000:]  # a graceful stop
        assert f"router_crash: SIGTERM in {window}" in log.read_text()
        assert not b.of(TaskAssigned, lambda e: e.task_id == "stop-1")
        # Faust acks a take_events batch on the way out; had that committed the offset, the
        # undecided task would never be routed by anyone.
        r.start()
        try:
            (a,) = b.wait(TaskAssigned, lambda e: e.task_id == "stop-1", timeout=60)
        except AssertionError as exc:  # seen once in CI: say where the task got to
            raise AssertionError(f"{exc}; {_whereabouts(ws, r, log)}") from None
        assert (a.attempt, a.agent_id) == (1, "st-a")
        wait_until(lambda: _state(ws, "stop-1") == "succeeded", 30, "stop-1 succeeded")
        text = log.read_text()
        assert "stopped with a batch in hand (1 records)" in text  # it knew,
        # and a stop that cut the table writes is not marked clean (one before them is).
        assert ("table files dropped" in text) == (window == "stop-in-finish")
    finally:
        b.close()
        r.stop()
        stopping.stop()


def test_a_record_faust_never_delivers_is_read_by_the_router_itself(
    ws: Settings, tmp_path: Path
) -> None:
    """faust-streaming now and then never delivers a partition's first records after a
    restart. A later record of the partition shows the gap (``_read_skipped``); for the
    last one nothing would, and the task would wait for ever. Seen once in CI: the stop test
    above, after its restart, never assigned its one task."""
    log = tmp_path / "router.log"
    r = CrashingRouter(ws, log, "never-delivered").start().started()
    b = Bus(ws)
    try:
        b.beating["nd-a"] = ["nd"]
        b.answer["nd-a"] = lambda a: 1.0
        b.wait(AgentHealthChanged, lambda e: e.agent_id == "nd-a", timeout=120)
        b.submit(task("drop-1", "nd", ["nd"]))  # alone: no later record shows the gap
        try:
            (a,) = b.wait(TaskAssigned, lambda e: e.task_id == "drop-1", timeout=90)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {_whereabouts(ws, r, log)}") from None
        assert (a.attempt, a.agent_id) == (1, "nd-a")
        text = log.read_text()
        assert "router_crash: drop-1 never delivered" in text
        assert "never reached the router in" in text
        assert "read by the router itself (1 records)" in text
        wait_until(lambda: _state(ws, "drop-1") == "succeeded", 30, "drop-1 succeeded")
        assert r.view("counters")["records_read_again"] >= 1
    finally:
        b.close()
        r.stop()


# ------------------------------------------------------------------------ pure parts --
def test_status_of_a_record_is_what_the_router_decided() -> None:
    t = {"task_id": "x"}
    assert status_of({"task": t, "state": "assigned", "attempt": 2, "agent": "a"}) == (
        TaskState.ASSIGNED,
        2,
        {"agent_id": "a"},
    )
    assert status_of({"task": t, "state": "waiting", "attempt": 0}) == (TaskState.WAITING, 1, {})
    assert status_of({"task": t, "state": "failed", "attempt": 3, "reason": "r"}) == (
        TaskState.FAILED,
        3,
        {"error": "r"},
    )
    # A ledger-only record (no task), a compacted one, one not decided yet: nothing to write.
    assert status_of({"state": "succeeded", "attempt": 1}) is None
    assert status_of({"task": t, "state": "succeeded", "compact": True}) is None
    assert status_of({"task": t, "state": "submitted", "attempt": 0}) is None


def _core() -> Any:
    from tests.test_router_core import core

    c = core()
    c.track_delivery = True  # as the app: deliveries are confirmed through delivered()
    return c


def test_an_assignment_not_confirmed_delivered_is_sent_again_then_not() -> None:
    from tests.test_router_core import T0
    from tests.test_router_core import task as core_task

    c = _core()
    c.directory.heartbeat({"x": ["a"]}, [])
    (a1,) = c.on_task(core_task("t", ["a"]), T0)
    # A restarted router's first tick: the same assignment (same event id), before any expiry.
    (again,), _ = c.on_tick("t", T0 + 1)
    assert again == a1
    c.delivered(0, c.seq[0])
    assert c.on_tick("t", T0 + 2) == ([], [])  # delivered now: nothing until it is due
    assert c.counters["resent"] == 1 and c.counters["expired"] == 0


def test_a_final_failure_not_confirmed_delivered_is_sent_again_whole() -> None:
    from tests.test_router_core import T0
    from tests.test_router_core import task as core_task

    c = _core()
    first = c.on_task(core_task("f", ["nobody"], deadline_ms=1000), T0)
    assert first == []
    fail, _ = c.on_tick("f", T0 + 2)
    assert [type(e).__name__ for e in fail] == ["Trajectory", "Reward"]
    again, _ = c.on_tick("f", T0 + 3)  # the kill came before the Reward was delivered
    assert again == fail  # the same events, not only the same ids
    c.delivered(0, c.seq[0])
    assert c.on_tick("f", T0 + 4) == ([], [])
