"""Logs of real processes: secrets masked by value on every handler, and a broker outage
that does not flood the log (a broker of this module's own, stopped and started again)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stormline.deploy import process
from stormline.deploy.stack import EmbeddedStack
from stormline.runtime.admin import TopicWanted, ensure_topics
from stormline.runtime.producer import RecordProducer
from stormline.settings import Settings
from tests.conftest import free_port, settings_env, wait_http, wait_until

GROQ_KEY = "gq-live-7f3a9c1e5b2d8046"  # a name and a shape no rule knows: only the value
SASL_PASSWORD = "sasl-pw-2c81f0b7"
REDIS_PASSWORD = "redis-pw-93e0d1aa"
REGISTRY_PASSWORD = "reg-pw-p@ss-51c4"  # percent-encoded in its URL


def test_every_configured_secret_is_masked_on_every_handler(tmp_path: Path) -> None:
    env = {
        **settings_env(Settings(data_dir=tmp_path)),
        "GROQ_KEY": GROQ_KEY,
        "STORMLINE_SECRET_ENV": '["GROQ_KEY"]',
        "STORMLINE_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
        "STORMLINE_REDIS_URL": f"redis://default:{REDIS_PASSWORD}@127.0.0.1:1/0",
        "STORMLINE_SCHEMA_REGISTRY_URL": "http://svc:reg-pw-p%40ss-51c4@127.0.0.1:1/apis",
    }
    out = subprocess.run(
        [sys.executable, "-m", "tests.log_child", "handlers"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    both = out.stdout + out.stderr
    assert "child.done done" in out.stdout  # the plain handler saw every line
    for secret in (
        GROQ_KEY,
        SASL_PASSWORD,
        REDIS_PASSWORD,
        "reg-pw-p%40ss-51c4",
        REGISTRY_PASSWORD,
    ):
        assert secret not in both, secret
    assert "GROQ_KEY is ***" in out.stdout and "redis://default:***@127.0.0.1" in out.stdout
    assert "bad key ***" in out.stdout  # the traceback too
    lines = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    assert any("bad key ***" in line.get("exc", "") for line in lines)


def test_repeat_limiter_tells_nodes_apart_and_counts_what_it_left_out() -> None:
    import logging

    from stormline.logs import RepeatLimiter

    lim = RepeatLimiter(interval_s=3600)

    def rec(node: int, err: str) -> logging.LogRecord:
        return logging.LogRecord(
            "aiokafka",
            logging.ERROR,
            "",
            0,
            "Unable connect to node with id %s: %s",
            (node, err),
            None,
        )

    assert lim.filter(rec(1, "refused")) and lim.filter(rec(2, "refused"))
    assert not any(lim.filter(rec(1, f"refused {i}")) for i in range(50))
    lim.interval_s = 0.001
    time.sleep(0.01)
    again = rec(1, "refused")
    assert lim.filter(again)
    assert again.getMessage().endswith("(50 more like it in the last 0s were not logged)")
    info = logging.LogRecord("aiokafka", logging.INFO, "", 0, "joined %s", (1,), None)
    assert lim.filter(info) and lim.filter(info)  # below WARNING: never limited


# ------------------------------------------------------------------- broker outage --
@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedStack, Settings]]:
    """A broker of this module's own: nothing else runs against it, so it may be stopped."""
    s = Settings(
        data_dir=tmp_path_factory.mktemp("logs-broker"),
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        schema_registry_url="none",  # neither registry nor Redis: only the broker starts
        redis_url="redis://127.0.0.1:1/0",
    )
    stack = EmbeddedStack(s)
    stack.up()
    yield stack, s
    stack.down()


@pytest.mark.faults
@pytest.mark.timeout(300)
def test_a_broker_outage_logs_a_few_lines_not_thousands(
    broker: tuple[EmbeddedStack, Settings], tmp_path: Path
) -> None:
    stack, s = broker
    s = s.model_copy(update={"log_repeat_interval_s": 4.0})
    topic = "outage"
    ensure_topics(s, [TopicWanted(topic, 1, 1)], timeout=30)
    log = tmp_path / "child.log"
    with log.open("w") as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.log_child", "aiokafka", topic, "120"],
            env=settings_env(s),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "started", log.read_text()[-2000:]
        pid = int((s.data_dir / "run" / "kafka.pid").read_text())
        process.stop_pid(pid, "kafka.Kafka", timeout=60)
        down_at = time.monotonic()
        # Wait for a sign the client saw the outage, then keep the broker away ~12 s.
        wait_until(lambda: "Unable" in log.read_text(), timeout=60, what="a connection error")
        time.sleep(max(0.0, 12 - (time.monotonic() - down_at)))
        stack.up()
        prod = RecordProducer(s)
        prod.produce(topic, "after the outage", "k")
        prod.flush(60)
        # The positive sign that the outage is over for the client: it reads again.
        assert child.stdout.readline().startswith("consumed"), log.read_text()[-2000:]
        outage = time.monotonic() - down_at
    finally:
        child.terminate()
        child.wait(30)
    text = log.read_text()
    errors = [
        line
        for line in text.splitlines()
        if line.startswith("{") and re.search(r"Unable|Failed fetch", line)
    ]
    left_out = sum(int(n) for n in re.findall(r"\((\d+) more like it", text))
    print(f"outage {outage:.0f}s: {len(errors)} lines logged, {left_out} left out")  # reported
    # Per (message, node): one line, then at most one every 4 s with a count.
    keys = {json.loads(e)["msg"].split(":")[0].split(" (")[0].strip() for e in errors}
    assert 1 <= len(errors) <= len(keys) * (outage // 4 + 2), "\n".join(errors[:20])
    assert any("were not logged" in e for e in errors), "\n".join(errors[:20])


# ------------------------------------------------------------- HTTP lines, task ids --
@pytest.fixture(scope="module")
def simulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`stormline simulate-llm` of this module's own (the LLM the HTTP clients call)."""
    port = free_port()
    log = tmp_path_factory.mktemp("sim") / "sim.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stormline.cli", "simulate-llm", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/v1/models")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def _json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` as JSON (a line that is not fails the test, with the line)."""
    out = []
    for line in text.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                pytest.fail(f"not a JSON line: {line[:300]!r}")
    return out


def _child_http(url: str, **env: str) -> list[dict[str, Any]]:
    run = subprocess.run(
        [sys.executable, "-m", "tests.log_child", "http", url],
        env={**settings_env(Settings()), "OPENAI_API_KEY": "sk-test-log-child-key", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return _json_lines(run.stderr)


def test_http_request_lines_only_when_asked_and_task_ids_on_lines(simulator: str) -> None:
    quiet = _child_http(simulator)
    loud = _child_http(simulator, STORMLINE_LOG_HTTP_REQUESTS="true")
    requests = [ln for ln in loud if "HTTP Request" in ln["msg"]]
    # Both SDK transports log one line per request (the httpx2 logger), when asked to.
    assert len(requests) >= 2 and {ln["logger"] for ln in requests} <= {"httpx", "httpx2"}
    assert not [ln for ln in quiet if "HTTP Request" in ln["msg"]], quiet
    for lines in (quiet, loud):
        called = [ln for ln in lines if ln["msg"].startswith("called over")]
        assert len(called) == 2
        assert all(ln["task_id"] == "task-42" and ln["agent"] == "agent-7" for ln in called)
        assert all("trace_id" not in ln for ln in lines)  # tracing off: no ids to show
        outside = next(ln for ln in lines if ln["msg"] == "outside the task")
        assert "task_id" not in outside and "agent" not in outside


def test_log_lines_carry_the_current_span(simulator: str) -> None:
    lines = _child_http(simulator, STORMLINE_OTEL_EXPORTER="console")
    spans = [ln for ln in lines if "context" in ln and "name" in ln]  # console exporter
    task = next(sp for sp in spans if sp["name"] == "child.task")
    called = [ln for ln in lines if ln.get("msg", "").startswith("called over")]
    assert len(called) == 2
    for ln in called:
        assert ln["trace_id"] == task["context"]["trace_id"].removeprefix("0x")
        assert ln["span_id"] == task["context"]["span_id"].removeprefix("0x")
    outside = next(ln for ln in lines if ln.get("msg") == "outside the task")
    assert "trace_id" not in outside


@pytest.mark.timeout(600)
def test_the_loop_logs_json_lines_with_task_and_trace_ids(
    stack_settings: Settings, tmp_path: Path
) -> None:
    """The services as real processes: every line of router, worker and evaluator is JSON
    (Faust's own included), no per-request HTTP lines, and a worker's line about a task
    carries its task id, agent and the task's trace id."""
    from tests.loop import Loop
    from tests.test_tracing import OtlpReceiver, otel_env, traces_by_task

    receiver = OtlpReceiver()
    # agent-2's model always answers 500: its tasks' error lines are lines about a task.
    sim = {
        "seed": 3,
        "default": {"skill": {"*": 0.8}, "latency_ms": 20},
        "models": {"sim-2": {"skill": {"*": 0.8}, "latency_ms": 5, "error_rate": 1.0}},
    }
    try:
        with Loop(stack_settings, tmp_path, workers=1, sim=sim, extra_env=otel_env(receiver)) as lp:
            tasks = []
            for seed in range(1, 6):
                tasks += lp.publish(8, seed=seed)
                worker_log = tmp_path / "logs" / "worker-0.log"
                if '"level": "warning"' in worker_log.read_text(errors="replace"):
                    break
                time.sleep(3)
            out = lp.wait_outcomes(timeout=300, settle=30)
            assert not out.missing({t.task_id for t in tasks})
            time.sleep(1)  # the last spans' export (every 200 ms)
    finally:
        receiver.close()
    logs_dir = tmp_path / "logs"
    lines = {
        n: _json_lines((logs_dir / f"{n}.log").read_text())
        for n in ("router", "worker-0", "evaluator")
    }
    assert any(ln["logger"].startswith("faust") for ln in lines["router"])
    assert all(ln["service"] == "router" for ln in lines["router"])
    noisy = ("httpx", "httpx2", "httpcore", "aiohttp", "openai", "anthropic")
    for name, got in lines.items():
        http = [ln for ln in got if ln["logger"].split(".")[0] in noisy and ln["level"] == "info"]
        assert not http, f"{name}: {http[:3]}"
    about_tasks = [ln for ln in lines["worker-0"] if ln.get("task_id")]
    assert about_tasks, "no worker line about a task (agent-2 always fails)"
    traces = traces_by_task(receiver.spans)
    for ln in about_tasks:
        assert ln["agent"] and ln["span_id"]
        assert ln["trace_id"] in traces[ln["task_id"]], ln
    print(
        {n: len(got) for n, got in lines.items()}, f"{len(about_tasks)} worker lines about tasks"
    )  # reported
