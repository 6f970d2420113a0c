"""`stormline up --all` runs the loop's services without the demo; `stormline down` ends them.

The shared test stack is external to this test's data directory, so `up --all` starts only
the supervisor (and its children) here, and `down` stops only that. The simulator runs on a
port other than 8700 and the agents are the shipped agents.yaml, unchanged: its
``${STORMLINE_SIMULATOR_PORT}`` must follow the setting, or no LLM call would succeed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from stormline.deploy import process
from stormline.deploy.demo_tasks import demo_tasks
from stormline.schemas.catalog import REWARDS
from stormline.schemas.kafka import EventConsumer, EventProducer
from stormline.schemas.models import RewardSource
from stormline.schemas.serde import Serde
from stormline.settings import Settings
from tests.conftest import free_port, settings_env

CLI = [sys.executable, "-m", "stormline.cli"]
EXAMPLE_AGENTS = Path(__file__).parent.parent / "agents.yaml"
SERVICES = {"simulate-llm", "router", "worker-1", "evaluator", "sink", "api"}


def test_up_all_runs_the_loop_and_down_stops_every_service(
    settings: Settings, tmp_path: Path
) -> None:
    s = settings.model_copy(
        update={
            "simulator_port": free_port(),
            "router_web_port": free_port(),
            "api_port": free_port(),
        }
    )
    env = {
        **settings_env(s),
        "STORMLINE_AGENTS_FILE": str(EXAMPLE_AGENTS),
        "STORMLINE_WORKER_HEARTBEAT_INTERVAL_S": "1",
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=240)

    up = cli("up", "--all", "--workers", "1", "--no-trainer")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        # A second `up --all` reuses the running supervisor instead of starting another.
        again = cli("up", "--all", "--workers", "1", "--no-trainer")
        assert again.returncode == 0 and "reusing" in again.stderr, again.stderr

        serde = Serde.from_settings(s)
        tasks = list(demo_tasks(20, run_id=uuid.uuid4().hex[:6]))
        EventProducer(s, serde).publish(tasks)
        scored: set[str] = set()
        verified: set[str] = set()  # scored by the verifier: the LLM call succeeded
        rewards = EventConsumer(s, serde, f"{s.topic_prefix}watch", [REWARDS])
        try:
            deadline = time.monotonic() + 180
            while len(scored) < len(tasks) and time.monotonic() < deadline:
                for r in rewards.poll_batch(500, 1.0):
                    scored.add(r.event.task_id)
                    if r.event.source == RewardSource.VERIFIER:
                        verified.add(r.event.task_id)
        finally:
            rewards.close()
        assert scored == {t.task_id for t in tasks}
        assert len(verified) > len(tasks) // 2, f"{len(verified)} of {len(tasks)} verified"

        st = cli("status", "--json", "--services-only")
        assert st.returncode == 0, st.stderr
        rows = json.loads(st.stdout)["supervised"]
        assert {r["name"] for r in rows} == SERVICES
        assert all(r["running"] for r in rows), rows
        pids = [int(r["pid"]) for r in rows]
    finally:
        down = cli("down")
    assert down.returncode == 0 and "supervisor" in down.stdout, down.stdout + down.stderr
    assert not any(process.cmdline(pid) for pid in pids)
    assert json.loads(cli("status", "--json", "--services-only").stdout)["supervised"] == []
    assert not os.path.exists(s.data_dir / "run" / "services.json")
