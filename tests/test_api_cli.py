"""`stormline keys` and `stormline dead-letters` as subprocesses against the real stack."""

from __future__ import annotations

import json
import uuid

import pytest

from stormline.api.deadletters import list_letters
from stormline.schemas.catalog import DEAD_LETTERS, TASKS
from stormline.schemas.kafka import EventProducer, dead_letter
from stormline.schemas.models import DeadLetter, TaskSubmitted
from stormline.schemas.serde import Serde
from stormline.settings import Settings
from tests.test_publish import read_topic, run_cli

pytestmark = pytest.mark.slow


def test_keys_create_list_revoke(topics: Settings) -> None:
    made = run_cli(["keys", "create", "--tenant", "acme", "--role", "submit", "--json"], topics)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert key["api_key"].startswith("stl_" + key["key_id"]) and key["roles"] == ["submit"]
    plain = run_cli(["keys", "create", "--tenant", "acme"], topics)
    assert plain.returncode == 0 and plain.stdout.strip().startswith("stl_")
    assert "read" in plain.stderr and "submit" in plain.stderr  # the default roles
    listed = run_cli(["keys", "list", "--json"], topics)
    rows = {r["key_id"]: r for r in json.loads(listed.stdout)}
    assert rows[key["key_id"]]["tenant"] == "acme" and not rows[key["key_id"]]["revoked"]
    secret = key["api_key"].split("_", 2)[2]
    assert secret not in listed.stdout and "hash" not in listed.stdout
    assert run_cli(["keys", "revoke", key["key_id"]], topics).returncode == 0
    listed = json.loads(run_cli(["keys", "list", "--json"], topics).stdout)
    assert {r["key_id"]: r["revoked"] for r in listed}[key["key_id"]] is True
    assert run_cli(["keys", "revoke", "0000000000000000"], topics).returncode == 1
    bad = run_cli(["keys", "create", "--tenant", "acme", "--role", "root"], topics)
    assert bad.returncode == 2


def _letters(s: Settings, serde: Serde) -> tuple[TaskSubmitted, list[DeadLetter]]:
    """Three letters: a good task a consumer refused (replayable), bytes that are no event,
    and a record from a topic outside the catalog (never a replay target)."""
    task = TaskSubmitted(task_id=f"dl-{uuid.uuid4().hex[:6]}", task_type="qa", prompt="p")
    good = serde.encode(TASKS.name(s), task)
    common = {"partition": 0, "group": "g", "kind": "handler"}
    letters = [
        dead_letter(
            s,
            topic=TASKS.name(s),
            offset=7,
            key=task.task_id.encode(),
            value=good,
            error="the router broke on it",
            **common,
        ),
        dead_letter(
            s,
            topic=TASKS.name(s),
            offset=8,
            key=None,
            value=b"plain text here",
            error="not avro",
            **common,
        ),
        dead_letter(
            s,
            topic="somebody-elses-topic",
            offset=1,
            key=None,
            value=good,
            error="foreign",
            **common,
        ),
    ]
    return task, [dl for dl in letters if dl is not None]


def test_dead_letters_list_and_replay(topics: Settings) -> None:
    s = topics.model_copy(update={"topic_partitions": {}})
    serde = Serde.from_settings(s)
    task, letters = _letters(s, serde)
    producer = EventProducer(s, serde)
    for dl in letters:
        producer.produce(dl, key=b"k", topic=DEAD_LETTERS.name(s))
    producer.flush(30)
    producer.close()
    views = {v.error: v for v in list_letters(s, serde)}
    assert set(views) == {"the router broke on it", "not avro", "foreign"}
    good = views["the router broke on it"]
    assert good.replayable and good.preview["task_id"] == task.task_id
    assert views["not avro"].preview == "plain text here" and views["not avro"].replayable
    assert not views["foreign"].replayable
    shown = run_cli(["dead-letters", "list", "--json"], s)
    assert shown.returncode == 0, shown.stderr
    assert {v["letter"] for v in json.loads(shown.stdout)} == {v.letter for v in views.values()}

    out = run_cli(["dead-letters", "replay", good.letter, views["foreign"].letter, "--json"], s)
    assert out.returncode == 1, out.stderr  # one was skipped, and says why
    report = json.loads(out.stdout)
    assert report["replayed"] == 1 and report["topics"] == {TASKS.name(s): 1}
    assert "not replayable" in report["skipped"][0]
    replayed = [serde.decode(m.value(), TaskSubmitted) for m in read_topic(s, TASKS, 1)]
    assert [t.task_id for t in replayed] == [task.task_id]
    assert run_cli(["dead-letters", "replay", "nope"], s).returncode == 2


def test_keys_and_dead_letters_exit_3_when_their_store_does_not_answer(topics: Settings) -> None:
    from tests.conftest import free_port

    dead_redis = topics.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    out = run_cli(["keys", "list"], dead_redis)
    assert out.returncode == 3 and "STORMLINE_REDIS_URL" in out.stderr, out.stderr
    dead_kafka = topics.model_copy(update={"kafka_bootstrap_servers": f"127.0.0.1:{free_port()}"})
    out = run_cli(["dead-letters", "list"], dead_kafka)
    assert out.returncode == 3 and "did not answer" in out.stderr, out.stderr
