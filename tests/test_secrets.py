"""Secrets by value: never in an event, a log line or an error, through real processes.

A real worker calls a local OpenAI-compatible server that echoes the key it was sent (into
an error, and into an answer); the key sits in a variable that no naming rule knows
(``api_key_env: GROQ_KEY``). A registry URL with credentials that nothing answers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from stormline import logs
from stormline.schemas.catalog import TRAJECTORIES
from stormline.schemas.kafka import EventConsumer, EventProducer
from stormline.schemas.models import (
    AssignedTask,
    DeadLetter,
    PolicyKind,
    TaskAssigned,
    Trajectory,
    TrajectoryStatus,
)
from stormline.schemas.serde import FingerprintRegistry, RegistryUnavailable, Serde
from stormline.settings import Settings
from tests.conftest import free_port, settings_env, wait_until

CLI = [sys.executable, "-m", "stormline.cli"]
KEY_VAR = "GROQ_KEY"  # matches no naming rule
KEY = "gq-live-41d7c0a9e83b5f62"  # nor any key shape


class EchoLLM(BaseHTTPRequestHandler):
    """Chat completions that give the caller's key back: model echo-error in a 401's
    message (as providers do: "Incorrect API key provided: ..."), echo-output in the answer."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        if body["model"] == "echo-error":
            status, out = 401, {"error": {"message": f"Incorrect API key provided: {key}"}}
        else:
            status, out = (
                200,
                {
                    "id": "c1",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": f"the key is {key}"},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
                },
            )
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:  # quiet
        pass


@pytest.fixture
def echo_llm() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), EchoLLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()


def _assignment(task_id: str, agent: str) -> TaskAssigned:
    now = datetime.now(UTC)
    return TaskAssigned(
        task_id=task_id,
        attempt=1,
        agent_id=agent,
        policy=PolicyKind.EXPLORE,
        assigned_at=now,
        expires_at=now + timedelta(minutes=10),
        task=AssignedTask(task_id=task_id, task_type="math", prompt="1 + 1?", occurred_at=now),
    )


def _trajectories(s: Settings, serde: Serde, n: int, timeout: float = 90) -> list[Trajectory]:
    c = EventConsumer(s, serde, f"{s.topic_prefix}read-{uuid.uuid4().hex[:6]}", [TRAJECTORIES])
    out: list[Trajectory] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            out += [r.event for r in c.poll_batch(100, 0.3)]
    finally:
        c.close()
    return out


def test_a_key_a_provider_echoes_reaches_no_event_and_no_log(
    topics: Settings, serde: Serde, echo_llm: str, tmp_path: Path
) -> None:
    agents = [
        {
            "id": aid,
            "provider": "openai",
            "model": aid,
            "base_url": echo_llm,
            "api_key_env": KEY_VAR,
            "capabilities": ["math"],
            "timeout_s": 5,
        }
        for aid in ("echo-error", "echo-output")
    ]
    path = tmp_path / "agents.yaml"
    path.write_text(yaml.safe_dump({"agents": agents}))
    s = topics.model_copy(update={"agents_file": path, "llm_retry_attempts": 1})
    prod = EventProducer(s, serde)
    prod.publish([_assignment("t-err", "echo-error"), _assignment("t-out", "echo-output")])
    prod.close()
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [*CLI, "worker", "--worker-id", "w-secrets"],
        env={**settings_env(s), KEY_VAR: KEY},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        trajs = {t.task_id: t for t in _trajectories(s, serde, 2)}
    finally:
        worker.terminate()
        worker.wait(60)
    assert set(trajs) == {"t-err", "t-out"}, log.read_text()[-3000:]
    err, out = trajs["t-err"], trajs["t-out"]
    assert err.status is TrajectoryStatus.ERROR and "Incorrect API key provided: ***" in (
        err.error or ""
    )
    assert out.output == "the key is ***" and all(KEY not in st.content for st in out.steps)
    assert KEY not in log.read_text() and "***" in log.read_text()


def test_a_registry_url_with_credentials_that_is_down_shows_no_password(
    topics: Settings, tmp_path: Path
) -> None:
    password = "reg-secret-9b27e1"
    url = f"http://svc:{password}@127.0.0.1:{free_port()}/apis/ccompat/v7"
    s = topics.model_copy(update={"schema_registry_url": url})
    with pytest.raises(RegistryUnavailable) as caught:
        Serde.from_settings(s).encode(TRAJECTORIES.name(s), _trajectory("x"))
    assert password not in str(caught.value) and "svc:***@127.0.0.1" in str(caught.value)
    # The command line reports it (exit 3: a dependency is down) without the password.
    cli = subprocess.run(
        [*CLI, "schemas", "register"],
        env=settings_env(s),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert cli.returncode == 3, cli.stdout + cli.stderr
    assert "did not answer" in cli.stdout + cli.stderr
    assert password not in cli.stdout + cli.stderr
    # A service keeps going and says so in its log, again without it.
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [*CLI, "worker", "--worker-id", "w-registry"],
        env=settings_env(s),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: "did not answer" in log.read_text(), timeout=90, what="the worker")
    finally:
        worker.terminate()
        worker.wait(60)
    assert password not in log.read_text()


# ------------------------------------------------------------ the serde boundary --
def _trajectory(error: str, output: str = "ok") -> Trajectory:
    return Trajectory(
        task_id="t1",
        trajectory_id="tr1",
        attempt=1,
        agent_id="a",
        status=TrajectoryStatus.ERROR,
        error=error,
        output=output,
    )


def test_the_serde_masks_every_registered_secret_in_every_text_field() -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex[:12]}"
    serde = Serde(FingerprintRegistry())
    clean = _trajectory("provider said no")
    before = serde.encode("t", clean)
    logs.register_secret(secret, "short")  # too short to be a secret: not masked
    assert serde.encode("t", clean) == before  # nothing to mask: the same bytes
    dirty = _trajectory(f"bad key {secret}", output=f"{secret}!short")
    data = serde.encode("t", dirty)
    assert secret.encode() not in data
    back = serde.decode(data, Trajectory)
    assert back.error == "bad key ***" and back.output == "***!short"
    letter = DeadLetter(
        source_topic="x",
        partition=0,
        offset=1,
        raw_value=b"\x00" + secret.encode(),
        error_kind="handler",
        error=f"RuntimeError: {secret}",
        consumer_group="g",
    )
    back_letter = serde.decode(serde.encode("d", letter), DeadLetter)
    assert back_letter.raw_value == b"\x00***" and back_letter.error == "RuntimeError: ***"
