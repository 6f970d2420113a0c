"""A whole Stormline loop for tests: services as real processes, tasks in, outcomes checked.

Used by the fault tests and the chaos test: each one publishes tasks, breaks something
mid-load, and then checks that every task has exactly one final outcome and how many LLM calls
were repeated. :class:`LoopHarness` is what they share (publish, wait, read back, count
calls) whoever runs the services; :class:`Loop` runs them under an in-process supervisor, the
chaos test under `stormline up --all`.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from confluent_kafka import KafkaException

from stormline.deploy.demo_tasks import demo_tasks
from stormline.deploy.supervisor import ServiceSpec, Supervisor
from stormline.runtime.admin import LEADER_ELECTION
from stormline.schemas.catalog import ASSIGNMENTS, CATALOG, REWARDS, TASKS, TRAJECTORIES
from stormline.schemas.kafka import EventConsumer, EventProducer, ensure_topics
from stormline.schemas.models import ROUTER_AGENT, Reward, TaskSubmitted, Trajectory
from stormline.schemas.serde import Serde
from stormline.settings import Settings
from stormline.streams.app import app_id
from tests.conftest import free_port, uncommitted, wait_http, wait_until


@dataclass
class Outcomes:
    rewards: dict[str, list[Reward]] = field(default_factory=lambda: defaultdict(list))
    trajectories: dict[str, list[Trajectory]] = field(default_factory=lambda: defaultdict(list))

    def missing(self, task_ids: set[str]) -> set[str]:
        return {t for t in task_ids if not self.rewards.get(t)}

    def conflicting_attempts(self) -> list[tuple[str, int]]:
        """(task, attempt) pairs with two different agent trajectories: the work was done
        twice. (The router's final failure names the last attempt too; it is no work.)"""
        out = []
        for task, trs in self.trajectories.items():
            ids: dict[int, set[str]] = defaultdict(set)
            for tr in trs:
                if tr.agent_id != ROUTER_AGENT:
                    ids[tr.attempt].add(tr.trajectory_id)
            out += [(task, a) for a, s in ids.items() if len(s) > 1]
        return out

    def rescored(self, task_id: str) -> list[tuple[str, str]]:
        """(trajectory, source) pairs scored more than once: two reward events with different
        ids for one judgement (a re-sent copy of one event, same id, counts once)."""
        ids: dict[tuple[str, str], set[str]] = defaultdict(set)
        for r in self.rewards.get(task_id, []):
            ids[(str(r.trajectory_id), str(r.source))].add(str(r.event_id))
        return [pair for pair, s in ids.items() if len(s) > 1]

    def router_failed(self, task_id: str) -> bool:
        """Whether the router declared the task's final failure (its own trajectory)."""
        return any(tr.agent_id == ROUTER_AGENT for tr in self.trajectories.get(task_id, []))

    def final_outcomes(self, task_id: str) -> int:
        """The task's final outcomes on the topics: the router's final failure (rewarded), or
        else the distinct rewarded trajectories of its last attempt. A late result after a
        final failure stays on the topics (it is learning data) but is not an outcome."""
        rs = self.rewards.get(task_id, [])
        if not rs:
            return 0
        router = {r.trajectory_id for r in rs if r.agent_id == ROUTER_AGENT}
        if router or self.router_failed(task_id):
            return len(router)
        last = max(r.attempt for r in rs)
        return len({r.trajectory_id for r in rs if r.attempt == last})


class LoopHarness:
    """What a test needs of a running loop, whoever runs its services: publish tasks, wait for
    their outcomes, read the topics back, count the LLM calls. ``tick`` is called while
    waiting (the in-process supervisor restarts crashed children there)."""

    def __init__(self, s: Settings, sim_url: str) -> None:
        self.s = s
        ensure_topics(self.s)
        self.serde = Serde.from_settings(self.s)
        for spec in CATALOG:
            self.serde.register(spec.name(self.s), spec.event)
        self.sim_url = sim_url
        self.tasks: list[TaskSubmitted] = []
        # Consumer groups that must commit their input to the end before the loop has
        # settled, beyond router, workers and evaluator: group -> topics.
        self.more_stages: dict[str, list[str]] = {}

    def tick(self) -> None:
        """Called while waiting; nothing to do when someone else supervises the services."""

    def publish(self, n: int, seed: int = 1) -> list[TaskSubmitted]:
        batch = list(demo_tasks(n, seed=seed, run_id=uuid.uuid4().hex[:6]))
        EventProducer(self.s, self.serde).publish(batch)
        self.tasks += batch
        return batch

    def wait_flowing(self, rewards: int = 5, timeout: float = 240.0) -> None:
        """Block until the loop has produced ``rewards`` rewards: it is really under load.

        On a busy machine the services take tens of seconds to import and join their groups;
        breaking something before that tests start-up, not recovery mid-load.
        """
        group = f"{self.s.topic_prefix}flow-{uuid.uuid4().hex[:4]}"
        c = EventConsumer(self.s, self.serde, group, [REWARDS])
        seen = 0
        deadline = time.monotonic() + timeout
        try:
            while seen < rewards and time.monotonic() < deadline:
                seen += len(c.poll_batch(500, 0.5))
                self.tick()
        finally:
            c.close()
        assert seen >= rewards, f"the loop produced {seen} rewards in {timeout:.0f}s"

    def wait_outcomes(self, timeout: float = 180.0, settle: float = 120.0) -> Outcomes:
        """Read rewards and trajectories until every published task has a reward; then, so
        that trailing duplicates (if any) are counted, until every stage that writes them has
        processed all of its input and this reader has read both topics to their end."""
        out = Outcomes()
        wanted = {t.task_id for t in self.tasks}
        group = f"{self.s.topic_prefix}check-{uuid.uuid4().hex[:4]}"
        c = EventConsumer(self.s, self.serde, group, [REWARDS, TRAJECTORIES])
        read_to: dict[tuple[str, int], int] = {}

        def read() -> None:
            batch = c.poll_batch(2000, 0.5)
            read_to.update(batch.positions)
            for rec in batch:
                ev = rec.event
                if isinstance(ev, Reward):
                    out.rewards[ev.task_id].append(ev)
                else:
                    out.trajectories[ev.task_id].append(ev)
            self.tick()

        deadline = time.monotonic() + timeout
        try:
            while out.missing(wanted) and time.monotonic() < deadline:
                read()
            if not out.missing(wanted):
                # A stage commits its input only after what it wrote for it was delivered, so
                # once all have committed to the end nothing more can arrive. A stage that never
                # gets there (a worker's commit position pinned by one failed record: issue 15,
                # finding 1) is reported, and the outcomes below are still checked in full.
                try:
                    wait_until(lambda: not self.stages_behind(), settle, "every stage", 0.5)
                except AssertionError:
                    print(f"stages still behind after {settle:.0f} s: {self.stages_behind()}")
                ends = self._end_offsets(c, [REWARDS.name(self.s), TRAJECTORIES.name(self.s)])
                wait_until(
                    lambda: read() or all(read_to.get(tp, 0) >= end for tp, end in ends.items()),
                    timeout=60,
                    what="the reader to reach the end of rewards and trajectories",
                )
        finally:
            c.close()
        return out

    def stages_behind(self) -> dict[str, object]:
        """The stages (router, workers, evaluator, and ``more_stages``) with records of their
        input not committed."""
        s = self.s
        inputs = [spec.name(s) for spec in (TASKS, TRAJECTORIES, REWARDS)]
        stages = {
            app_id(s): inputs,
            s.topic(s.worker_group): [ASSIGNMENTS.name(s)],
            s.evaluator_group: [TRAJECTORIES.name(s)],
            **self.more_stages,
        }
        self.tick()
        behind: dict[str, object] = {}
        for group, topics in stages.items():
            try:
                behind[group] = uncommitted(s, group, topics)
            except KafkaException as exc:
                # A partition between leaders (a broker just restarted): ask again next time.
                behind[group] = f"unknown: {exc.args[0]}"
        return {group: left for group, left in behind.items() if left}

    # The name the fault tests knew it by.
    _stages_behind = stages_behind

    @staticmethod
    def _end_offsets(c: EventConsumer, topics: list[str]) -> dict[tuple[str, int], int]:
        from confluent_kafka import TopicPartition

        md = c.raw.list_topics(timeout=10)
        ends = {}
        for t in topics:
            for p in md.topics[t].partitions:
                # Retried while a partition is between leaders (a broker just restarted).
                for attempt in LEADER_ELECTION.retrying(lambda e: isinstance(e, KafkaException)):
                    with attempt:
                        ends[(t, p)] = c.raw.get_watermark_offsets(
                            TopicPartition(t, p), timeout=10
                        )[1]
        return ends

    def llm_calls(self) -> Counter[str]:
        stats = httpx.get(f"{self.sim_url}/admin/stats", timeout=5).json()
        return Counter(stats["by_prompt"])

    def attempts_called(self, outcomes: Outcomes) -> Counter[str]:
        """Per prompt, the attempts that an agent (not the router) recorded a trajectory for."""
        attempts: Counter[str] = Counter()
        prompts = {t.task_id: t.prompt for t in self.tasks}
        for task, trs in outcomes.trajectories.items():
            if task in prompts:
                attempts[prompts[task]] += len(
                    {tr.attempt for tr in trs if tr.provider != "router"}
                )
        return attempts

    def duplicate_llm_calls(self, outcomes: Outcomes) -> int:
        """LLM calls beyond one per attempt (retries of failed calls count too)."""
        attempts = self.attempts_called(outcomes)
        calls = self.llm_calls()
        return sum(max(0, calls[p] - attempts[p]) for p in attempts)


class Loop(LoopHarness):
    """The loop's services under an in-process supervisor, on the given (shared) stack."""

    def __init__(
        self,
        base: Settings,
        tmp: Path,
        *,
        workers: int = 2,
        sink: bool = False,
        trainer: bool = False,
        sim: dict[str, Any] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        s = base.model_copy(
            update={
                "topic_prefix": f"f{uuid.uuid4().hex[:6]}.",
                "data_dir": tmp,
                "simulator_port": free_port(),
                "router_web_port": free_port(),
            }
        )
        super().__init__(s, f"http://127.0.0.1:{s.simulator_port}")
        cfg = tmp / "sim.yaml"
        cfg.write_text(
            yaml.safe_dump(sim or {"seed": 3, "default": {"skill": {"*": 0.8}, "latency_ms": 20}})
        )
        agents = tmp / "agents.yaml"
        agents.write_text(yaml.safe_dump({"agents": sim_agents(self.s.simulator_port)}))
        specs = [
            ServiceSpec("simulate-llm", ["simulate-llm", "--config", str(cfg)]),
            ServiceSpec("router", ["router"]),
            *[
                ServiceSpec(f"worker-{i}", ["worker", "--worker-id", f"w{i}"])
                for i in range(workers)
            ],
            ServiceSpec("evaluator", ["evaluator"]),
        ]
        if sink:
            specs.append(ServiceSpec("sink", ["sink"]))
        if trainer:
            specs.append(ServiceSpec("trainer", ["trainer"]))
        env = {k: "" for k in os.environ if k.startswith("STORMLINE_")}
        env.update(
            {
                f"STORMLINE_{k.upper()}": str(v)
                for k, v in self.s.model_dump().items()
                if v is not None and not isinstance(v, dict | list)
            }
        )
        env.update(
            {
                "STORMLINE_AGENTS_FILE": str(agents),
                "OPENAI_API_KEY": "sk-test-fault-key",
                **FAST_LOOP_ENV,
                **(extra_env or {}),
            }
        )
        self.sup = Supervisor(specs, logs=tmp / "logs", env=env)

    def tick(self) -> None:
        self.sup.tick()

    def __enter__(self) -> Loop:
        self.sup.start()
        wait_http(f"{self.sim_url}/v1/models")
        return self

    def __exit__(self, *exc: object) -> None:
        self.sup.stop()

    def kill9(self, name: str) -> int:
        pid = self.sup.pids()[name]
        os.kill(pid, signal.SIGKILL)
        return pid


# Settings that make a test loop react in seconds, not minutes: attempts expire after 20 s,
# workers say they are alive every second, the trainer trains on 100 experiences and saves its
# join state (committing its offsets) every 2 s.
FAST_LOOP_ENV = {
    "STORMLINE_ROUTER_ASSIGNMENT_TTL_S": "20",
    "STORMLINE_WORKER_HEARTBEAT_INTERVAL_S": "1",
    "STORMLINE_TRAINER_BATCH_SIZE": "100",
    "STORMLINE_TRAINER_STATE_INTERVAL_S": "2",
}


def sim_agents(port: int, n: int = 3) -> list[dict[str, Any]]:
    """``n`` agents on the simulated LLM at ``port``, each able to do every demo task."""
    return [
        {
            "id": f"agent-{i}",
            "provider": "openai",
            "model": f"sim-{i}",
            "base_url": f"http://127.0.0.1:{port}/v1",
            "capabilities": ["math", "reverse", "upper", "sort"],
            "concurrency": 64,
            "timeout_s": 3,
            "max_tokens": 32,
        }
        for i in range(n)
    ]
