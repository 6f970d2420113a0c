"""Finding 3 of issue 14: the registry away never costs the router a task.

The router is killed (its schema cache goes with it) and restarted while the registry is
down: it cannot decode the tasks sent meanwhile. Before, ``forward_tasks`` caught only
DecodeError: RegistryUnavailable crashed the actor, Faust acked the batch, and those tasks
were never routed nor dead-lettered. Now the transient failure is retried until the
registry is back. This module starts a stack of its own (broker, registry, Redis on free
ports), because it stops the registry.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stormline.deploy import process
from stormline.deploy.stack import EmbeddedStack
from stormline.schemas.kafka import ensure_topics
from stormline.schemas.models import AgentHealthChanged, DeadLetter, Reward, TaskAssigned
from stormline.settings import Settings
from tests.conftest import free_port
from tests.test_router import Bus, RouterProcess, task

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedStack, Settings]]:
    s = Settings(
        data_dir=tmp_path_factory.mktemp("registry-stack"),
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


def _stop_registry(s: Settings) -> None:
    pid = int((Path(s.data_dir) / "run" / "registry.pid").read_text())
    os.kill(pid, signal.SIGKILL)  # the registry this module started, by its pid
    for _ in range(200):
        if not process.cmdline(pid):  # gone (a zombie child has no command line either)
            return
        time.sleep(0.1)
    raise AssertionError(f"registry {pid} did not stop")


def test_tasks_sent_while_the_registry_is_down_are_routed_once_it_is_back(
    own_stack: tuple[EmbeddedStack, Settings], tmp_path: Path
) -> None:
    stack, base = own_stack
    s = base.model_copy(
        update={
            "topic_prefix": f"g{uuid.uuid4().hex[:8]}.",
            "data_dir": tmp_path,
            "router_web_port": free_port(),
            # Pinned as in the conftest: what follows treats the stack as external.
            "kafka_bootstrap_servers": base.bootstrap_servers,
            "schema_registry_url": base.registry_url,
            "redis_url": base.redis_address,
        }
    )
    ensure_topics(s)
    # Agents are not judged down while the router cannot read their heartbeats.
    env = {
        "STORMLINE_ROUTER_ASSIGNMENT_TTL_S": "120",
        "STORMLINE_ROUTER_HEARTBEAT_TIMEOUT_S": "300",
    }
    r = RouterProcess(s, tmp_path / "router.log", **env).start()
    b = Bus(s)
    try:
        b.beating["reg-a"] = ["reg"]
        b.answer["reg-a"] = lambda a: 1.0
        b.wait(AgentHealthChanged, lambda e: e.agent_id == "reg-a", timeout=60)
        b.submit(task("reg-warm", "reg", ["reg"]))  # the bus's schema ids are cached now
        b.wait(TaskAssigned, lambda e: e.task_id == "reg-warm", timeout=60)
        # Answered: the bus has every schema id it produces cached (it plays the workers).
        b.wait(Reward, lambda e: e.task_id == "reg-warm", timeout=60)

        r.kill9()
        _stop_registry(base)
        r.start()  # a fresh process: no writer schema cached
        ids = [f"reg-{i}" for i in range(60)]
        b.submit(*[task(i, "reg", ["reg"]) for i in ids])
        # The router has read them (its consumer is past them) but cannot decode them yet.
        time.sleep(8)
        assert not b.of(TaskAssigned, lambda e: e.task_id in ids)
        stack.up()  # the registry again (broker and Redis are reused)
        got = b.wait(TaskAssigned, lambda e: e.task_id in ids, n=len(ids), timeout=180)
        assert sorted({a.task_id for a in got}) == sorted(ids)
        assert all(a.attempt == 1 for a in got)
        assert not b.of(DeadLetter), [d.error for d in b.of(DeadLetter)]
    finally:
        b.close()
        r.stop()
