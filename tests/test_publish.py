"""Producers and evaluators against the real broker, registry and Redis.

publish (CLI in a subprocess and Python API), human rewards (`stormline reward`), and the
evaluator service (trajectories -> rewards, failures, dead letters, an LLM judge reached
through the official openai SDK on a local HTTP server, no key leaking). Longer than ~400
lines because publish, feedback and the evaluator share the fixtures that read topics back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from stormline.consumers.evaluator.service import EvaluatorService
from stormline.producers.feedback import (
    FeedbackError,
    find_latest_trajectory,
    record_reward,
)
from stormline.producers.publish import publish_tasks
from stormline.runtime.partitioning import partition_for
from stormline.schemas.catalog import DEAD_LETTERS, REWARDS, TASKS, TRAJECTORIES, TopicSpec
from stormline.schemas.kafka import EventProducer, end_offsets
from stormline.schemas.models import (
    DeadLetter,
    Reward,
    RewardSource,
    Step,
    TaskSubmitted,
    Trajectory,
    TrajectoryStatus,
)
from stormline.schemas.serde import Serde
from stormline.settings import Settings
from tests.conftest import free_port, settings_env

CLI = [sys.executable, "-m", "stormline.cli"]


def run_cli(
    args: list[str], settings: Settings, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        CLI + args,
        env={**settings_env(settings), **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def read_topic(
    settings: Settings, spec: TopicSpec, expect: int, timeout: float = 30.0
) -> list[Any]:
    """Every record of a topic from the beginning: waits for ``expect``, then reads on to the
    end of every partition, so that duplicates already written would show."""
    topic = spec.name(settings)
    c = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    n = len(c.list_topics(topic, timeout=10).topics[topic].partitions)
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(n)])
    out: list[Any] = []
    at_end: set[int] = set()  # partitions read to their end offset (since their last record)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if len(out) >= expect and len(at_end) == n:
                break
            for msg in c.consume(500, 0.2):
                if msg.error() is None:
                    out.append(msg)
                    at_end.discard(msg.partition())
                elif msg.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition())
    finally:
        c.close()
    return out


def trajectory(task_id: str, **kw: Any) -> Trajectory:
    base: dict[str, Any] = {
        "task_id": task_id,
        "trajectory_id": f"{task_id}/1",
        "attempt": 1,
        "agent_id": "agent-a",
        "task_type": "qa",
        "provider": "openai",
        "model": "m",
        "policy_version": "router@1",
        "status": TrajectoryStatus.OK,
        "output": "4",
        "steps": [Step(role="user", content=f"question of {task_id}")],
    }
    base.update(kw)
    return Trajectory.model_validate(base)


# ============================================================================ publish ==
def test_publish_cli_sends_valid_lines_reports_invalid_ones(
    topics: Settings, serde: Serde, tmp_path: Path
) -> None:
    lines: list[str] = []
    bad: dict[int, str] = {}
    for i in range(30):
        task: dict[str, Any] = {"task_type": "qa", "prompt": f"question {i}", "expected": str(i)}
        if i < 10:
            task["task_id"] = f"task-{i}"
        lines.append(json.dumps(task))
        if i == 3:
            lines.append('{"task_type": "qa", "prompt": "unterminated')
            bad[len(lines)] = "not JSON"
        if i == 7:
            lines.append(json.dumps({"task_type": "qa", "prompt": ""}))
            bad[len(lines)] = "prompt"
        if i == 12:
            lines.append(json.dumps({"task_type": "qa", "prompt": "p", "priority": 99}))
            bad[len(lines)] = "priority"
        if i == 20:
            lines.append(json.dumps({"task_type": "qa", "prompt": "x" * 100_001}))
            bad[len(lines)] = "prompt: String should have at most 100000 characters"
            lines.append("")  # blank lines are skipped, but counted in line numbers
            lines.append(json.dumps(["a list"]))
            bad[len(lines)] = "expected a JSON object"
    src = tmp_path / "tasks.jsonl"
    src.write_text("\n".join(lines) + "\n")

    out = run_cli(["publish", str(src)], topics)

    assert out.returncode == 1, out.stdout + out.stderr
    assert "sent 30 tasks" in out.stdout
    assert "invalid 5" in out.stdout
    for line_no, reason in bad.items():
        assert f"line {line_no}: " in out.stderr
        reported = out.stderr.split(f"line {line_no}: ", 1)[1].splitlines()[0]
        assert reason in reported, (line_no, reported)

    msgs = read_topic(topics, TASKS, 30)
    assert len(msgs) == 30
    n_partitions = TASKS.partitions(topics)
    by_id = {}
    for m in msgs:
        task = serde.decode(m.value(), TaskSubmitted)
        assert m.key().decode() == task.task_id
        # the producer's partitioner (librdkafka consistent_random = CRC32 of the key)
        assert m.partition() == partition_for(task.task_id, n_partitions)
        by_id[task.task_id] = task
    assert {f"task-{i}" for i in range(10)} <= set(by_id)
    generated = set(by_id) - {f"task-{i}" for i in range(10)}
    assert len(generated) == 20
    for tid in generated:
        uuid.UUID(tid)  # generated ids are uuid4s
    assert by_id["task-5"].expected == "5"

    from stormline.state import task_status

    assert (task_status(topics, "task-3") or {}).get("state") == "submitted"


def test_publish_from_stdin_all_valid_exits_0_with_json_summary(topics: Settings) -> None:
    stdin = "".join(
        json.dumps({"task_id": f"s{i}", "task_type": "qa", "prompt": "p"}) + "\n" for i in range(5)
    )
    out = run_cli(["publish", "--json", "-"], topics, stdin=stdin)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout)
    assert (summary["sent"], summary["invalid"]) == (5, 0)
    assert summary["seconds"] > 0
    assert len(read_topic(topics, TASKS, 5)) == 5

    missing = run_cli(["publish", "/no/such/file.jsonl"], topics)
    assert missing.returncode == 2
    assert "no such file" in missing.stderr


def test_publish_tasks_python_api(topics: Settings, serde: Serde) -> None:
    items = [
        {"task_type": "qa", "prompt": "one"},
        TaskSubmitted(task_id="model-1", task_type="qa", prompt="two"),
        {"task_type": "qa", "prompt": "bad", "surprise": 1},  # unknown field
        {"task_id": "dict-1", "task_type": "qa", "prompt": "three", "priority": 0},
    ]
    report = publish_tasks(topics, items)
    assert report.sent == 3
    assert [(i.line, "surprise" in i.reason) for i in report.invalid] == [(3, True)]
    assert report.task_ids[1:] == ["model-1", "dict-1"]
    assert not report.ok
    assert report.rate > 0
    keys = sorted(m.key().decode() for m in read_topic(topics, TASKS, 3))
    assert keys == sorted(report.task_ids)


# ============================================================================ rewards ==
def test_reward_cli_finds_latest_trajectory_of_the_task(topics: Settings, serde: Serde) -> None:
    producer = EventProducer(topics, serde)
    producer.publish(
        [
            trajectory("T", trajectory_id="T/1", attempt=1, agent_id="agent-a"),
            *(trajectory(f"other-{i}") for i in range(30)),
            trajectory("T", trajectory_id="T/2", attempt=2, agent_id="agent-b", task_type="math"),
            trajectory("other-x"),
        ]
    )

    ok = run_cli(["reward", "T", "0.9", "--reason", "good answer"], topics)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    missing = run_cli(["reward", "nope", "1"], topics)
    assert missing.returncode == 1
    assert "--trajectory-id" in missing.stderr
    given = run_cli(
        ["reward", "nope", "1", "--trajectory-id", "nope/7", "--agent-id", "agent-z"], topics
    )
    assert given.returncode == 0, given.stderr
    with pytest.raises(FeedbackError, match=r"\[0, 1\]"):
        record_reward(topics, "T", 3.0)
    with pytest.raises(FeedbackError, match="unknown reward source"):
        record_reward(topics, "T", 1.0, source="crowd")

    rewards = {
        r.task_id: r
        for r in (serde.decode(m.value(), Reward) for m in read_topic(topics, REWARDS, 2))
    }
    assert set(rewards) == {"T", "nope"}
    r = rewards["T"]
    assert (r.trajectory_id, r.agent_id, r.attempt, r.task_type) == ("T/2", "agent-b", 2, "math")
    assert (r.value, r.source, r.reason) == (0.9, RewardSource.HUMAN, "good answer")
    assert (rewards["nope"].trajectory_id, rewards["nope"].agent_id) == ("nope/7", "agent-z")

    from stormline.state import task_status

    assert (task_status(topics, "T") or {}).get("reward") == "0.9"


def test_lookup_reads_backwards_through_many_windows(topics: Settings, serde: Serde) -> None:
    n = TRAJECTORIES.partitions(topics)
    target = "needle"
    same_partition = [
        k
        for k in (f"hay-{i}" for i in range(400))
        if partition_for(k, n) == partition_for(target, n)
    ][:60]
    producer = EventProducer(topics, serde)
    producer.publish(
        [
            trajectory(target, trajectory_id="needle/1"),
            trajectory(target, trajectory_id="needle/2", attempt=2),
            *(trajectory(k) for k in same_partition),
        ]
    )
    found = find_latest_trajectory(topics, target, serde=serde, first_window=2)
    assert found is not None
    assert found.trajectory.trajectory_id == "needle/2"
    assert found.partition == partition_for(target, n)
    older = find_latest_trajectory(topics, target, trajectory_id="needle/1", first_window=3)
    assert older is not None and older.trajectory.attempt == 1
    assert find_latest_trajectory(topics, "absent", first_window=7) is None


# ========================================================================== evaluator ==
def test_evaluator_service_scores_failures_dead_letters_and_commits(
    topics: Settings, serde: Serde
) -> None:
    s = topics.model_copy(update={"evaluator_by_task_type": {"math": "numeric:0.01"}})
    producer = EventProducer(s, serde)
    producer.publish(
        [
            trajectory("right", output="The answer is 4.", expected="4", task_type="math"),
            trajectory("wrong", output="Paris", expected="London"),
            trajectory("norm", output=" paris! ", expected="Paris"),
            trajectory("err", status=TrajectoryStatus.ERROR, output=None, error="server: 503 x3"),
            trajectory("slow", status=TrajectoryStatus.TIMEOUT, output=None, error="no answer"),
            trajectory("noexp", output="x", evaluator="exact"),  # cannot be scored: dead letter
        ]
    )
    raw = Producer({"bootstrap.servers": s.bootstrap_servers})
    raw.produce(TRAJECTORIES.name(s), key=b"next", value=b"\x00\x00\x00\x00\x01garbage")
    raw.flush(10)
    producer.publish([trajectory("next", output="ok", expected="OK", policy_version="ckpt@9")])

    service = EvaluatorService(s, group_id=f"{s.topic_prefix}evaluator")
    deadline = time.monotonic() + 60
    while service.scored < 6 and time.monotonic() < deadline:
        service.step()
    committed = service.consumer.raw.committed(
        [TopicPartition(TRAJECTORIES.name(s), p) for p in range(TRAJECTORIES.partitions(s))],
        timeout=10,
    )
    service.close()

    ends = end_offsets(s, TRAJECTORIES.name(s), TRAJECTORIES.partitions(s))
    assert [tp.offset if tp.offset >= 0 else 0 for tp in committed] == ends

    rewards = {
        r.task_id: r for r in (serde.decode(m.value(), Reward) for m in read_topic(s, REWARDS, 6))
    }
    assert set(rewards) == {"right", "wrong", "norm", "err", "slow", "next"}
    assert (rewards["right"].value, rewards["right"].source) == (1.0, RewardSource.VERIFIER)
    assert rewards["right"].components["within_tolerance"] == 1.0
    assert rewards["wrong"].value == 0.0
    assert rewards["norm"].components == {"normalised_match": 1.0, "exact_match": 0.0}
    assert (rewards["err"].value, rewards["err"].source, rewards["err"].reason) == (
        0.0,
        RewardSource.FAILURE,
        "server: 503 x3",
    )
    assert rewards["slow"].source == RewardSource.TIMEOUT
    nxt = rewards["next"]
    assert (nxt.value, nxt.policy_version, nxt.trajectory_id, nxt.attempt) == (
        1.0,
        "ckpt@9",
        "next/1",
        1,
    )

    letters = [serde.decode(m.value(), DeadLetter) for m in read_topic(s, DEAD_LETTERS, 2)]
    kinds = {(d.key(), d.error_kind) for d in letters}
    assert ("next", "avro") in kinds or ("next", "unknown-schema") in kinds, kinds
    handler = [d for d in letters if d.key() == "noexp"]
    assert handler and "needs the task's 'expected'" in handler[0].error

    # The same group again: everything was committed, so nothing is scored twice.
    again = EvaluatorService(s, group_id=f"{s.topic_prefix}evaluator")
    for _ in range(6):
        again.step()
    again.close()
    assert again.scored == 0
    assert len(read_topic(s, REWARDS, 6)) == 6


class JudgeServer:
    """A judge on a local port, speaking OpenAI's /v1/chat/completions and Anthropic's
    /v1/messages: scores 8/10, records key headers and prompts. ``fail_first`` requests
    get 503; prompts containing "REFUSE" get 400."""

    def __init__(self, leak: str = "", fail_first: int = 0) -> None:
        self.auth: list[str] = []
        self.prompts: list[str] = []
        self.paths: list[str] = []
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests += 1
                outer.paths.append(self.path)
                outer.auth.append(
                    self.headers.get("x-api-key") or self.headers.get("Authorization") or ""
                )
                prompt = body["messages"][-1]["content"]
                outer.prompts.append(prompt)
                if outer.requests <= fail_first:
                    return self._send(503, {"error": {"message": "overloaded"}})
                if "REFUSE" in prompt:
                    return self._send(400, {"error": {"message": "bad request"}})
                # A reply that (mis)quotes the key: the evaluator must not pass it on.
                content = json.dumps({"score": 8, "reason": f"fine, said {leak}"})
                if self.path.endswith("/messages"):
                    reply: dict[str, Any] = {
                        "id": "msg_1",
                        "type": "message",
                        "role": "assistant",
                        "model": body["model"],
                        "content": [{"type": "text", "text": content}],
                        "stop_reason": "end_turn",
                        "stop_sequence": None,
                        "usage": {"input_tokens": 10, "output_tokens": 5},
                    }
                else:
                    reply = {
                        "id": "cmpl-1",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": content},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                    }
                self._send(200, reply)

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                return None

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> JudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize(
    ("provider", "base", "key_env", "path"),
    [
        ("openai", "/v1", "OPENAI_API_KEY", "/v1/chat/completions"),
        ("anthropic", "", "ANTHROPIC_API_KEY", "/v1/messages"),
    ],
)
async def test_judge_through_the_official_sdks(
    provider: str,
    base: str,
    key_env: str,
    path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from stormline.consumers.evaluator import rules as evaluators
    from stormline.consumers.evaluator.service import make_judge

    key = f"sk-judge-{uuid.uuid4().hex}"
    monkeypatch.setenv(key_env, key)
    with JudgeServer() as server:
        s = Settings(
            judge_provider=provider,
            judge_model="judge-1",
            judge_base_url=f"http://127.0.0.1:{server.port}{base}",
        )
        judge = make_judge(s)
        assert judge is not None
        try:
            result = await evaluators.judge(
                judge,
                trajectory("j", output="Paris"),
                spec=evaluators.Spec("judge"),
                default_rubric="RUBRIC-X",
                model=s.judge_model,
            )
        finally:
            await judge.aclose()
    assert (result.value, result.source) == (0.8, RewardSource.JUDGE)
    assert len(server.auth) == 1 and server.auth[0].endswith(key)  # x-api-key or Bearer
    assert server.paths == [path]
    assert "RUBRIC-X" in server.prompts[0] and "Paris" in server.prompts[0]


def test_evaluator_waits_out_a_judge_outage_and_dead_letters_refusals(
    topics: Settings, serde: Serde, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-outage-test-key-000")
    with JudgeServer(fail_first=5) as server:
        s = topics.model_copy(
            update={
                "judge_provider": "openai",
                "judge_base_url": f"http://127.0.0.1:{server.port}/v1",
                "llm_retry_attempts": 2,
                "llm_backoff_base_s": 0.01,
                "breaker_failure_threshold": 100,
            }
        )
        EventProducer(s, serde).publish(
            [trajectory("late", output="fine"), trajectory("refused", output="REFUSE")]
        )
        service = EvaluatorService(s, group_id=f"{s.topic_prefix}evaluator")
        deadline = time.monotonic() + 60
        while service.scored + service.dead < 2 and time.monotonic() < deadline:
            service.step()
        service.close()
    assert server.requests > 5  # the 503s were retried past the per-call retry budget
    rewards = [serde.decode(m.value(), Reward) for m in read_topic(s, REWARDS, 1)]
    assert [(r.task_id, r.value) for r in rewards] == [("late", 0.8)]
    letters = [serde.decode(m.value(), DeadLetter) for m in read_topic(s, DEAD_LETTERS, 1)]
    assert [(d.key(), d.error_kind) for d in letters] == [("refused", "handler")]
    assert "judge refused" in letters[0].error


@pytest.fixture
def api_key() -> Iterator[str]:
    yield f"sk-stormline-test-{uuid.uuid4().hex}"


def test_evaluator_with_judge_leaks_no_key_and_stops_on_sigterm(
    topics: Settings, serde: Serde, api_key: str
) -> None:
    with JudgeServer(leak=api_key) as judge:
        env = {
            "OPENAI_API_KEY": api_key,
            "STORMLINE_JUDGE_PROVIDER": "openai",
            "STORMLINE_JUDGE_MODEL": "judge-model",
            "STORMLINE_JUDGE_BASE_URL": f"http://127.0.0.1:{judge.port}/v1",
            "STORMLINE_EVALUATOR_GROUP": f"{topics.topic_prefix}evaluator",
        }
        proc = subprocess.Popen(
            [*CLI, "evaluator"],
            env={**settings_env(topics), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            EventProducer(topics, serde).publish(
                [
                    trajectory("judged", output="Paris is the capital of France."),
                    trajectory("judged2", output="Lyon", evaluator="judge:capital cities only"),
                    trajectory(
                        "failed",
                        status=TrajectoryStatus.ERROR,
                        output=None,
                        error=f"client: 401 invalid key {api_key}",
                    ),
                    trajectory("verified", output="4", expected="4"),
                ]
            )
            msgs = read_topic(topics, REWARDS, 4, timeout=60)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                stdout, stderr = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert "evaluator stopped" in stderr

    rewards = {r.task_id: r for r in (serde.decode(m.value(), Reward) for m in msgs)}
    assert set(rewards) == {"judged", "judged2", "failed", "verified"}, stderr[-3000:]
    judged = rewards["judged"]
    assert (judged.source, judged.value, judged.components["judge_score"]) == (
        RewardSource.JUDGE,
        0.8,
        8.0,
    )
    assert rewards["verified"].source == RewardSource.VERIFIER
    assert rewards["failed"].source == RewardSource.FAILURE
    # the judge was really called through the SDK, with the key and the rubric
    assert judge.auth and all(a == f"Bearer {api_key}" for a in judge.auth)
    assert any("capital cities only" in p for p in judge.prompts)
    assert any("question of judged" in p for p in judge.prompts)
    # ... and the key is nowhere in events or logs
    for m in msgs:
        assert api_key.encode() not in m.value()
    assert "***" in (rewards["failed"].reason or "")
    assert "***" in (judged.reason or "")
    assert api_key not in stdout + stderr
    assert os.environ.get("OPENAI_API_KEY") != api_key
