"""The router through the real broker: a `stormline router` subprocess, the test plays workers.

One router serves the module (fast clocks, see ROUTER_ENV); each test uses its own agents,
capabilities and task types so they do not see each other's work. The kill -9 test runs
its own router. Longer than ~400 lines for that reason: the tests share the one router
subprocess the module starts (starting one takes ~10 s).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Producer

from stormline.schemas.catalog import (
    AGENT_HEALTH,
    ASSIGNMENTS,
    DEAD_LETTERS,
    REWARDS,
    TASKS,
    TRAJECTORIES,
)
from stormline.schemas.kafka import EventConsumer, EventProducer, ensure_topics
from stormline.schemas.models import (
    AgentHealthChanged,
    AgentHeartbeat,
    DeadLetter,
    Event,
    HealthStatus,
    PolicyKind,
    Reward,
    RewardSource,
    TaskAssigned,
    TaskSubmitted,
    Trajectory,
    TrajectoryStatus,
    WorkerStatus,
)
from stormline.schemas.serde import Serde
from stormline.settings import Settings
from stormline.state import task_status
from tests.conftest import free_port, settings_env, wait_router_caught_up, wait_until

ROUTER_ENV = {
    "STORMLINE_ROUTER_TICK_S": "0.2",
    "STORMLINE_ROUTER_ASSIGNMENT_TTL_S": "4",
    "STORMLINE_ROUTER_MAX_ATTEMPTS": "2",
    "STORMLINE_ROUTER_RETRY_S": "0.3",
    "STORMLINE_ROUTER_HEARTBEAT_TIMEOUT_S": "3",
    "STORMLINE_ROUTER_CIRCUIT_ERRORS": "3",
    "STORMLINE_ROUTER_CIRCUIT_COOLDOWN_S": "1",
    "STORMLINE_ROUTER_PROBE_TASKS": "1",
    "STORMLINE_ROUTER_PROBE_SUCCESSES": "1",
    "STORMLINE_ROUTER_SEED": "7",
    "STORMLINE_ROUTER_DONE_RETENTION_S": "2",
}


# ------------------------------------------------------------------------ harness --
class RouterProcess:
    def __init__(self, settings: Settings, log: Path, **env: str) -> None:
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.router_web_port}"
        self.log = log
        self.env = {**settings_env(settings), **ROUTER_ENV, **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RouterProcess:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stormline.cli", "router", "--log-level", "warning"],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parent.parent,
        )
        return self.started()

    def started(self, timeout: float = 90) -> RouterProcess:
        """Once its web server answers (the counters view answers from the start)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/router/counters/", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError("router did not start: " + self.log.read_text()[-3000:])

    def view(self, name: str, timeout: float = 60) -> Any:
        """A web view's first 200 answer. A table view answers 503 while the worker recovers
        its tables (after a start, a restart, a rebalance); every answer before the 200 must
        be that 503, so no partial table is ever read."""
        deadline, refused = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            got = httpx.get(f"{self.url}/router/{name}/", timeout=5)
            if got.status_code == 200:
                return got.json()
            assert got.status_code == 503 and "recovering" in got.json()["error"], got.text
            assert got.headers["Retry-After"] == "1"
            refused += 1
            time.sleep(0.05)
        raise AssertionError(f"/router/{name}/ never answered 200 ({refused} answers 503)")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


class Bus:
    """Produces events; collects assignments, health changes, trajectories, rewards, DLQ.

    ``answer`` maps an agent id to a function (assignment -> reward value or None); an
    assignment for such an agent is answered at once with a Trajectory and, if a value is
    returned, a Reward: the test plays worker and evaluator.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.serde = Serde.from_settings(settings)
        self.producer = EventProducer(settings, self.serde, **{"linger.ms": 0})
        self.events: list[Event] = []
        self.lock = threading.Lock()
        self.answer: dict[str, Callable[[TaskAssigned], float | None]] = {}
        self.beating: dict[str, list[str]] = {}
        self._stop = threading.Event()
        self._consumer = EventConsumer(
            settings,
            self.serde,
            f"{settings.topic_prefix}test-bus-{uuid.uuid4().hex[:6]}",
            [ASSIGNMENTS, AGENT_HEALTH, TRAJECTORIES, REWARDS, DEAD_LETTERS],
        )
        self._threads = [
            threading.Thread(target=self._consume, daemon=True),
            threading.Thread(target=self._beat, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _consume(self) -> None:
        while not self._stop.is_set():
            batch = self._consumer.poll_batch(500, 0.1)
            for rec in batch:
                with self.lock:
                    self.events.append(rec.event)
                if isinstance(rec.event, TaskAssigned) and rec.event.agent_id in self.answer:
                    self._respond(rec.event)
            self.producer.poll(0)

    def _respond(self, a: TaskAssigned) -> None:
        value = self.answer[a.agent_id](a)
        tid = f"{a.task_id}-{a.attempt}"
        status = TrajectoryStatus.OK if value is None or value >= 0 else TrajectoryStatus.ERROR
        self.producer.produce(
            Trajectory(
                task_id=a.task_id,
                trajectory_id=tid,
                attempt=a.attempt,
                agent_id=a.agent_id,
                task_type=a.task.task_type,
                status=status,
                output="ok",
            )
        )
        if value is not None and value >= 0:
            self.producer.produce(self.reward(a, value))
        self.producer.flush()

    @staticmethod
    def reward(a: TaskAssigned, value: float) -> Reward:
        return Reward(
            task_id=a.task_id,
            trajectory_id=f"{a.task_id}-{a.attempt}",
            attempt=a.attempt,
            agent_id=a.agent_id,
            task_type=a.task.task_type,
            value=value,
            source=RewardSource.VERIFIER,
        )

    def _beat(self) -> None:
        while not self._stop.is_set():
            for agent, caps in list(self.beating.items()):
                self.producer.produce(
                    AgentHeartbeat(
                        worker_id=f"w-{agent}",
                        agent_ids=[agent],
                        capabilities={agent: caps},
                        status=WorkerStatus.RUNNING,
                    )
                )
            self.producer.flush()
            self._stop.wait(0.4)

    def submit(self, *tasks: TaskSubmitted) -> None:
        self.producer.publish(tasks)

    def of(self, etype: type[Event], pred: Callable[[Any], bool] = lambda e: True) -> list[Any]:
        with self.lock:
            return [e for e in self.events if isinstance(e, etype) and pred(e)]

    def wait(
        self,
        etype: type[Event],
        pred: Callable[[Any], bool] = lambda e: True,
        n: int = 1,
        timeout: float = 30,
    ) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.of(etype, pred)
            if len(got) >= n:
                return got
            time.sleep(0.05)
        raise AssertionError(f"waited {timeout}s for {n} {etype.__name__}; got {len(got)}")

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        self._consumer.close()
        self.producer.close()


def task(tid: str, ttype: str, caps: list[str], **kw: Any) -> TaskSubmitted:
    return TaskSubmitted(
        task_id=tid, task_type=ttype, prompt="2+2?", required_capabilities=caps, **kw
    )


@pytest.fixture(scope="module")
def rsettings(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    s = stack_settings.model_copy(
        update={
            "topic_prefix": f"r{uuid.uuid4().hex[:8]}.",
            "data_dir": tmp_path_factory.mktemp("router"),
            "router_web_port": free_port(),
        }
    )
    ensure_topics(s)
    return s


@pytest.fixture(scope="module")
def router(rsettings: Settings) -> Iterator[RouterProcess]:
    r = RouterProcess(rsettings, Path(rsettings.data_dir) / "router.log").start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def bus(rsettings: Settings, router: RouterProcess) -> Iterator[Bus]:
    b = Bus(rsettings)
    yield b
    b.close()


# -------------------------------------------------------------------------- tests --
def test_capability_matching_and_learning_end_to_end(router: RouterProcess, bus: Bus) -> None:
    """Two agents can do `sum`; only one can also do `proof`. The good one is learned."""
    rng = random.Random(5)
    p = {"cm-good": 0.9, "cm-weak": 0.2}
    bus.beating.update({"cm-good": ["sum", "proof"], "cm-weak": ["sum"]})
    for a in p:
        bus.answer[a] = lambda a, a_id=a: float(rng.random() < p[a_id])
    bus.wait(AgentHealthChanged, lambda e: e.agent_id == "cm-weak", timeout=20)
    bus.wait(AgentHealthChanged, lambda e: e.agent_id == "cm-good", timeout=20)

    bus.submit(*[task(f"cm-p{i}", "cm-proof", ["sum", "proof"]) for i in range(10)])
    got = bus.wait(TaskAssigned, lambda e: e.task_id.startswith("cm-p"), n=10)
    assert {a.agent_id for a in got} == {"cm-good"}
    assert all(a.task.required_capabilities == ["sum", "proof"] for a in got)

    for wave in range(8):
        bus.submit(*[task(f"cm-s{wave}-{i}", "cm-sum", ["sum"]) for i in range(10)])
        bus.wait(TaskAssigned, lambda e: e.task_id.startswith("cm-s"), n=10 * (wave + 1))
        # The wave's rewards land before the next wave, as they would with real workers.
        _wait_view(
            router,
            lambda v, n=10 * (wave + 1): sum(c["count"] for c in v.get("cm-sum", {}).values()) >= n,
        )
    assigned = bus.of(TaskAssigned, lambda e: e.task_id.startswith("cm-s"))
    last = [a for a in assigned if a.task_id.startswith(("cm-s6-", "cm-s7-"))]
    assert sum(a.agent_id == "cm-good" for a in last) >= 15, [a.agent_id for a in last]
    assert all(a.strategy == "thompson" and a.attempt == 1 for a in assigned)
    q = _wait_view(router, lambda v: sum(c["count"] for c in v.get("cm-sum", {}).values()) == 80)
    assert q["cm-sum"]["cm-good"]["value"] > q["cm-sum"]["cm-weak"]["value"]


def test_duplicate_reward_is_counted_once(router: RouterProcess, bus: Bus) -> None:
    bus.beating["dup-a"] = ["dup"]
    bus.wait(AgentHealthChanged, lambda e: e.agent_id == "dup-a", timeout=20)
    bus.submit(task("dup-1", "dup-type", ["dup"]))
    (a,) = bus.wait(TaskAssigned, lambda e: e.task_id == "dup-1")
    r = Bus.reward(a, 1.0)
    dups = router.view("counters")["rewards_duplicate"]
    bus.producer.publish([r, r, r.model_copy(update={"event_id": uuid.uuid4()})])
    q = _wait_view(
        router, lambda v: "dup-a" in v.get("dup-type", {}) and v["dup-type"]["dup-a"]["count"] >= 1
    )
    # All three reached the router: the two repeats are counted as duplicates.
    wait_until(
        lambda: router.view("counters")["rewards_duplicate"] >= dups + 2,
        what="the repeated rewards to be counted as duplicates",
    )
    q = router.view("qtable")
    assert q["dup-type"]["dup-a"]["count"] == 1
    assert router.view("counters")["rewards_duplicate"] >= 2


def test_a_reward_redelivered_after_the_done_retention_counts_once(
    router: RouterProcess, bus: Bus
) -> None:
    """Issue 14, finding 2: the dedup outlives the task record (2 s here, five minutes by
    default): a reward redelivered later, while the rewards topic keeps it, counts once, and
    the task published again is not routed again."""
    bus.beating["ret-a"] = ["ret"]
    bus.answer["ret-a"] = lambda a: 1.0
    bus.wait(AgentHealthChanged, lambda e: e.agent_id == "ret-a", timeout=20)
    forgotten = router.view("counters")["forgotten"]
    bus.submit(task("ret-1", "ret-type", ["ret"]))
    (a,) = bus.wait(TaskAssigned, lambda e: e.task_id == "ret-1")
    bus.wait(Reward, lambda e: e.task_id == "ret-1")
    _wait_view(router, lambda v: v.get("ret-type", {}).get("ret-a", {}).get("count") == 1)
    wait_until(
        lambda: router.view("counters")["forgotten"] > forgotten,
        what="the finished task's record to be forgotten (its ledger stays)",
    )
    dups = router.view("counters")["rewards_duplicate"]
    bus.producer.publish([Bus.reward(a, 1.0)])
    wait_until(
        lambda: router.view("counters")["rewards_duplicate"] > dups,
        what="the redelivered reward to be recognised",
    )
    assert router.view("qtable")["ret-type"]["ret-a"]["count"] == 1
    seen = router.view("counters")["tasks_duplicate"]
    bus.submit(task("ret-1", "ret-type", ["ret"]))  # the same task id published again
    wait_until(
        lambda: router.view("counters")["tasks_duplicate"] > seen,
        what="the task published again to be recognised",
    )
    assert len(bus.of(TaskAssigned, lambda e: e.task_id == "ret-1")) == 1


def test_task_no_agent_can_serve_fails_with_its_reason(
    router: RouterProcess, bus: Bus, rsettings: Settings
) -> None:
    bus.submit(task("nobody-1", "nobody", ["telepathy"], deadline_ms=1500))
    (tr,) = bus.wait(Trajectory, lambda e: e.task_id == "nobody-1", timeout=20)
    assert tr.final and tr.status == TrajectoryStatus.ERROR
    assert tr.error == "no capable healthy agent"
    (rw,) = bus.wait(Reward, lambda e: e.task_id == "nobody-1")
    assert rw.source == RewardSource.FAILURE and rw.value == 0
    assert not bus.of(TaskAssigned, lambda e: e.task_id == "nobody-1")
    # Garbage on the tasks topic is dead-lettered and the router goes on.
    p = Producer({"bootstrap.servers": rsettings.bootstrap_servers})
    p.produce(TASKS.name(rsettings), key=b"junk", value=b"not avro at all")
    p.flush(10)
    (dl,) = bus.wait(DeadLetter, lambda e: e.raw_key == b"junk", timeout=20)
    assert dl.error_kind == "framing" and dl.source_topic == TASKS.name(rsettings)
    bus.beating["late-agent"] = ["late-cap"]
    bus.submit(task("late-1", "late", ["late-cap"]))
    bus.wait(TaskAssigned, lambda e: e.task_id == "late-1", timeout=20)


def test_the_router_writes_assigned_and_final_task_states(
    router: RouterProcess, bus: Bus, rsettings: Settings
) -> None:
    """contracts.md: the router decides and writes assigned, waiting, succeeded, failed."""
    bus.beating.update({"st-ok": ["st-ok"], "st-mute": ["st-mute"]})
    bus.answer["st-ok"] = lambda a: 1.0
    bus.wait(AgentHealthChanged, lambda e: e.agent_id == "st-mute", timeout=20)
    bus.wait(AgentHealthChanged, lambda e: e.agent_id == "st-ok", timeout=20)
    bus.submit(
        task("st-1", "st", ["st-ok"]),
        task("st-2", "st", ["st-mute"]),
        task("st-3", "st", ["st-nobody"], deadline_ms=1500),
    )

    def state(tid: str) -> dict[str, str]:
        return task_status(rsettings, tid) or {}

    wait_until(lambda: state("st-1").get("state") == "succeeded", what="st-1 succeeded")
    wait_until(lambda: state("st-2").get("state") == "assigned", what="st-2 assigned")
    assert state("st-2")["agent_id"] == "st-mute" and state("st-2")["attempt"] == "1"
    wait_until(lambda: state("st-3").get("state") == "failed", what="st-3 failed")
    assert state("st-3")["error"] == "no capable healthy agent"


def test_expiry_reassigns_to_another_agent_then_fails(router: RouterProcess, bus: Bus) -> None:
    bus.beating.update({"ex-1": ["expire"], "ex-2": ["expire"]})  # alive, never answering
    bus.wait(AgentHealthChanged, lambda e: e.agent_id == "ex-2", timeout=20)
    bus.wait(AgentHealthChanged, lambda e: e.agent_id == "ex-1", timeout=20)
    bus.submit(task("ex-t", "expire", ["expire"]))
    a1, a2 = bus.wait(TaskAssigned, lambda e: e.task_id == "ex-t", n=2, timeout=20)
    assert (a1.attempt, a2.attempt) == (1, 2)
    assert a1.agent_id != a2.agent_id  # the next attempt prefers another agent
    assert (a2.assigned_at - a1.assigned_at).total_seconds() >= 4.0
    assert a1.expires_at <= a2.assigned_at
    (tr,) = bus.wait(Trajectory, lambda e: e.task_id == "ex-t", timeout=20)
    assert (
        tr.final and tr.error == "attempt 2 expired; no result after 2 attempts" and tr.attempt == 2
    )
    (rw,) = bus.wait(Reward, lambda e: e.task_id == "ex-t")
    assert rw.source == RewardSource.FAILURE
    # A later task of the same type is routed after every record queued before it for that
    # type (ticks included): once it is assigned, a third attempt of ex-t would have been made.
    for agent in ("ex-1", "ex-2"):
        bus.answer[agent] = lambda a: 1.0
    bus.submit(task("ex-later", "expire", ["expire"]))
    bus.wait(TaskAssigned, lambda e: e.task_id == "ex-later", timeout=20)
    _wait_bus_saw_every_assignment(router, bus)
    assert len(bus.of(TaskAssigned, lambda e: e.task_id == "ex-t")) == 2


def test_down_agent_gets_nothing_and_a_recovered_one_gets_a_probe(
    router: RouterProcess, bus: Bus
) -> None:
    bus.beating.update({"dn-flaky": ["dn"], "dn-solid": ["dn"]})
    for a in ("dn-flaky", "dn-solid"):
        bus.answer[a] = lambda a: 1.0
    bus.wait(AgentHealthChanged, lambda e: e.agent_id == "dn-flaky", timeout=20)
    del bus.beating["dn-flaky"]
    bus.wait(
        AgentHealthChanged,
        lambda e: e.agent_id == "dn-flaky" and e.status == HealthStatus.DOWN,
        timeout=20,
    )
    bus.submit(*[task(f"dn-a{i}", "dn", ["dn"]) for i in range(15)])
    got = bus.wait(TaskAssigned, lambda e: e.task_id.startswith("dn-a"), n=15)
    assert {a.agent_id for a in got} == {"dn-solid"}

    bus.answer.pop("dn-flaky")  # hold the probe unanswered to count probes
    bus.beating["dn-flaky"] = ["dn"]
    bus.wait(
        AgentHealthChanged,
        lambda e: (
            e.agent_id == "dn-flaky"
            and e.status == HealthStatus.DEGRADED
            and e.previous == HealthStatus.DOWN
        ),
        timeout=20,
    )
    # The router's directory (what routing reads) has seen the agent come back, half open.
    wait_until(
        lambda: (
            router.view("health")["directory"].get("dn-flaky", {}).get("status")
            == HealthStatus.DEGRADED.value
        ),
        what="the router's directory to see dn-flaky degraded",
    )
    for i in range(30):
        bus.submit(task(f"dn-b{i}", "dn", ["dn"]))
        if bus.of(
            TaskAssigned, lambda e: e.task_id.startswith("dn-b") and e.agent_id == "dn-flaky"
        ):
            break
        time.sleep(0.05)
    bus.submit(*[task(f"dn-c{i}", "dn", ["dn"]) for i in range(10)])
    bus.wait(TaskAssigned, lambda e: e.task_id.startswith("dn-c"), n=10)
    _wait_bus_saw_every_assignment(router, bus)
    probes = bus.of(
        TaskAssigned, lambda e: e.task_id.startswith(("dn-b", "dn-c")) and e.agent_id == "dn-flaky"
    )
    assert len(probes) == 1, "a half-open agent gets exactly probe_tasks=1 probe"
    (probe,) = probes
    assert probe.policy == PolicyKind.EXPLORE  # a probe is sent on purpose, not by the Q-table
    bus.answer["dn-flaky"] = lambda a: 1.0
    bus._respond(probe)
    bus.wait(
        AgentHealthChanged,
        lambda e: (
            e.agent_id == "dn-flaky"
            and e.status == HealthStatus.HEALTHY
            and e.previous == HealthStatus.DEGRADED
        ),
        timeout=20,
    )


def test_qtable_recovers_after_router_kill9(stack_settings: Settings, tmp_path: Path) -> None:
    s = stack_settings.model_copy(
        update={
            "topic_prefix": f"k{uuid.uuid4().hex[:8]}.",
            "data_dir": tmp_path,
            "router_web_port": free_port(),
        }
    )
    ensure_topics(s)
    # A long TTL: this test is about the Q-table, not about attempts expiring during restart.
    r = RouterProcess(s, tmp_path / "router.log", STORMLINE_ROUTER_ASSIGNMENT_TTL_S="60").start()
    b = Bus(s)
    try:
        rng = random.Random(2)
        b.beating.update({"k-a": ["k"], "k-b": ["k"]})
        b.answer["k-a"] = lambda a: float(rng.random() < 0.8)
        b.answer["k-b"] = lambda a: round(rng.random(), 3)
        b.wait(AgentHealthChanged, lambda e: e.agent_id == "k-b", timeout=20)
        b.wait(AgentHealthChanged, lambda e: e.agent_id == "k-a", timeout=20)
        b.submit(*[task(f"k{i}", "k-type", ["k"]) for i in range(40)])
        b.wait(Reward, lambda e: e.task_id.startswith("k"), n=40)
        before = _wait_view(
            r, lambda v: sum(c["count"] for c in v.get("k-type", {}).values()) == 40
        )
        time.sleep(1.5)  # past a commit interval; kill -9 must lose nothing either way
        before = r.view("qtable")
        r.kill9()
        r.start()
        # Its web views answer before recovery ends: until then the Q-table view says 503,
        # never a partial table (its very first full answer is the table of before).
        assert r.view("qtable") == before
        assert not r.view("counters")["recovering"]
        # Redelivered or repeated rewards after the restart still count once.
        wait_router_caught_up(s)  # what was redelivered after the restart is processed
        dups = r.view("counters")["rewards_duplicate"]
        (a,) = b.of(TaskAssigned, lambda e: e.task_id == "k0")
        b.producer.publish([Bus.reward(a, 1.0)])
        wait_until(
            lambda: r.view("counters")["rewards_duplicate"] > dups,
            what="the repeated reward to reach the router",
        )
        assert r.view("qtable") == before
        b.submit(task("k-new", "k-type", ["k"]))
        b.wait(Reward, lambda e: e.task_id == "k-new")
        _wait_view(r, lambda v: sum(c["count"] for c in v["k-type"].values()) == 41)
        wait_router_caught_up(s)  # and nothing more arrives: no update was applied twice
        q = r.view("qtable")
        assert sum(c["count"] for c in q["k-type"].values()) == 41, r.view("counters")
        assert r.view("counters")["assigned"] == 1  # nothing from before the kill was redone
    finally:
        b.close()
        r.stop()


def _wait_bus_saw_every_assignment(r: RouterProcess, bus: Bus) -> None:
    """Until the bus has read every assignment the router made so far (its counters)."""
    wait_until(
        lambda: len(bus.of(TaskAssigned)) >= r.view("counters")["assigned"],
        what="the bus to read every assignment the router counted",
    )


def _wait_view(r: RouterProcess, pred: Callable[[Any], bool], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    v: Any = None
    while time.monotonic() < deadline:
        try:
            v = r.view("qtable")
            if pred(v):
                return v
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"Q-table view never matched; last: {v}")
