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

import pytest

from stormline.deploy import process
from stormline.deploy.stack import EmbeddedStack
from stormline.runtime.admin import TopicWanted, ensure_topics
from stormline.runtime.producer import RecordProducer
from stormline.settings import Settings
from tests.conftest import free_port, settings_env, wait_until

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
