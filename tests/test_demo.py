"""`stormline demo --real`: the README's main command on the real-model path.

The real-model agents (``deploy/agents.real.yaml``) reach a simulated LLM that this test
starts, through the official SDKs' own base-URL variables (``OPENAI_BASE_URL``,
``ANTHROPIC_BASE_URL``), so the whole demo runs as it would with API keys: supervised
services, live progress, analytics, reward curve, a published checkpoint. The keys must not
leak into the output or any service log.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from stormline.settings import Settings
from tests.conftest import free_port, settings_env, wait_http

CLI = [sys.executable, "-m", "stormline.cli"]
OPENAI_KEY = "sk-demo-test-0f3c9a"
ANTHROPIC_KEY = "sk-ant-demo-test-7d21e4"
REAL_AGENTS = {"gpt-mini", "gpt-nano", "claude-haiku"}


@pytest.mark.slow
@pytest.mark.timeout(720)
def test_demo_real_models_path_end_to_end(settings: Settings, tmp_path: Path) -> None:
    port = free_port()
    sim_cfg = tmp_path / "sim.yaml"
    sim_cfg.write_text(
        yaml.safe_dump(
            {
                "seed": 5,
                "default": {"skill": {"*": 0.5}, "latency_ms": 5},
                "models": {
                    "gpt-4o-mini": {"skill": {"*": 0.9}, "latency_ms": 5},
                    "gpt-4.1-nano": {"skill": {"*": 0.3}, "latency_ms": 5},
                    "claude-haiku-4-5": {"skill": {"*": 0.6}, "latency_ms": 5},
                },
            }
        )
    )
    env = {
        **settings_env(settings),
        "STORMLINE_ROUTER_WEB_PORT": str(free_port()),
        "OPENAI_API_KEY": OPENAI_KEY,
        "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
        "OPENAI_BASE_URL": f"http://127.0.0.1:{port}/v1",
        "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}",
    }
    sim = subprocess.Popen(
        [*CLI, "simulate-llm", "--port", str(port), "--config", str(sim_cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    summary = tmp_path / "summary.json"
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models")
        demo = subprocess.run(
            [
                *CLI,
                "demo",
                "--real",
                "--tasks",
                "80",
                "--workers",
                "1",
                "--rate",
                "40",
                "--timeout",
                "300",
                "--checkpoint-wait",
                "300",
                "--summary-json",
                str(summary),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=700,
        )
        stats = httpx.get(f"http://127.0.0.1:{port}/admin/stats", timeout=5).json()
    finally:
        sim.terminate()
        sim.wait(10)

    out = demo.stdout + demo.stderr
    assert demo.returncode == 0, out[-4000:]
    result = json.loads(summary.read_text())
    assert result["scored"] == result["tasks"] == 80
    assert 0.0 <= result["reward_first_20"] <= 1.0 and 0.0 <= result["reward_last_20"] <= 1.0
    assert result["checkpoints"], "the trainer published no checkpoint"
    assert "checkpoints published: neural-router@" in out
    assert Path(result["reward_curve_png"]).read_bytes()[:4] == b"\x89PNG"
    rows = {r["agent_id"]: r for r in result["per_agent"]}
    assert set(rows) <= REAL_AGENTS and sum(int(r["tasks"]) for r in rows.values()) >= 80
    # Both official SDKs were used: OpenAI's chat completions and Anthropic's messages.
    assert stats["by_model"].get("claude-haiku-4-5", 0) > 0
    assert stats["by_model"].get("gpt-4o-mini", 0) + stats["by_model"].get("gpt-4.1-nano", 0) > 0
    # Secrets come from the environment and appear nowhere else.
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*.log"))
    for key in (OPENAI_KEY, ANTHROPIC_KEY):
        assert key not in out and key not in logs
