"""Findings of the review of Router v2 (c0f48f2), each as a test that failed on that code.

RouterCore and ShardBook on dicts with time passed in, as tests/test_router_outcomes.py;
the table files a killed router leaves are tested on a real directory. (A sixth finding,
that Faust's producer flush may return before the changelog has a batch's writes, is fixed
in streams/app.py by awaiting each write's acknowledgement; the broker tests cover it.)
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from stormline.schemas.models import (
    Reward,
    RewardSource,
    TaskAssigned,
    TaskSubmitted,
    Trajectory,
    TrajectoryStatus,
)
from stormline.settings import Settings
from stormline.streams.health import Directory, HealthConfig
from stormline.streams.qtable import QCell, cell_key
from stormline.streams.router import RouterConfig, RouterCore
from stormline.streams.shards import ShardBook
from stormline.streams.strategies import StrategyConfig

T0 = 1_800_000_000.0
HC = HealthConfig(cooldown_s=10, probe_tasks=1, probe_successes=1)
PAIR = cell_key("qa", "x")


def core(
    tasks: MutableMapping[str, Any] | None = None,
    ledger: MutableMapping[str, Any] | None = None,
    **kw: Any,
) -> RouterCore:
    cfg = RouterConfig(
        strategy=StrategyConfig(name="thompson"),
        health=HC,
        assignment_ttl_s=5,
        max_attempts=3,
        retry_s=1,
        **kw,
    )
    c = RouterCore(
        cfg,
        tasks={} if tasks is None else tasks,
        ledger={} if ledger is None else ledger,
        directory=Directory(health=HC),
    )
    c.directory.heartbeat({"x": ["a"]}, [])
    return c


def task(tid: str) -> TaskSubmitted:
    return TaskSubmitted(
        task_id=tid,
        task_type="qa",
        prompt="p",
        required_capabilities=["a"],
        occurred_at=datetime.fromtimestamp(T0, UTC),
    )


def assign(c: RouterCore, tid: str, now: float = T0, p: int = 0) -> TaskAssigned:
    (a,) = c.on_task(task(tid), now, p)
    assert isinstance(a, TaskAssigned)
    return a


def reward(a: TaskAssigned, value: float, source: RewardSource = RewardSource.VERIFIER) -> Reward:
    return Reward(
        task_id=a.task_id,
        trajectory_id=f"{a.task_id}-{a.attempt}",
        attempt=a.attempt,
        agent_id=a.agent_id,
        task_type="qa",
        value=value,
        source=source,
    )


def human_by_ids(a: TaskAssigned, value: float) -> Reward:
    """What ``stormline reward TASK --trajectory-id T --agent-id A`` (or the API with both ids)
    publishes: producers/feedback.py skips the lookup, so attempt is 0 and task_type ''."""
    return Reward(
        task_id=a.task_id,
        trajectory_id=f"{a.task_id}-{a.attempt}",
        agent_id=a.agent_id,
        value=value,
        source=RewardSource.HUMAN,
    )


def publish(src: ShardBook, dst: ShardBook) -> None:
    """One stats interval: what src changed, through the compacted topic (JSON), into dst."""
    for p, pair, cell in src.take_dirty():
        dst.snapshot(p, pair, QCell.from_dict(cell.to_dict()))


# ----------------------------------------------------- shards merged across workers --
def test_a_human_correction_reaches_the_other_workers() -> None:
    """ShardBook.snapshot keeps a snapshot only if (count, pulls) grew (shards.newer). A
    replacement (human reward, or a late real reward replacing an expiry) changes neither, so
    every other worker drops it and keeps deciding on the automatic value."""
    owner, other = core(), ShardBook()
    a = assign(owner, "t")
    assert owner.on_reward(reward(a, 1.0), T0)
    publish(owner.book, other)
    assert other.cell(PAIR).value == 1.0
    assert owner.on_reward(reward(a, 0.0, RewardSource.HUMAN), T0 + 1)
    assert owner.book.cell(PAIR).value == 0.0  # the owner's own view has it
    publish(owner.book, other)
    assert other.cell(PAIR).value == 0.0, "the correction never reached the other worker"


def test_a_late_real_result_replacing_an_expiry_reaches_the_other_workers() -> None:
    owner, other = core(), ShardBook()
    a = assign(owner, "t")
    owner.on_tick("t", T0 + 5)  # expired: failure_value 0 counted, attempt 2 assigned
    publish(owner.book, other)
    assert owner.on_reward(reward(a, 1.0), T0 + 6)  # attempt 1's real result replaces it
    publish(owner.book, other)
    assert other.cell(PAIR).successes == owner.book.cell(PAIR).successes == 1.0


# ------------------------------------------------------------ human reward, once --
def test_a_human_reward_given_by_ids_before_the_automatic_one_counts_once() -> None:
    """'A human reward replaces the automatic one once, in either order.' Given both ids the
    feedback producer sends attempt 0; before the evaluator's reward there is no ledger entry
    naming the trajectory, so it is counted as attempt 0, and the automatic reward (attempt 1)
    is counted beside it: two observations for one attempt, the automatic value included."""
    c = core()
    a = assign(c, "t")
    assert c.on_reward(human_by_ids(a, 0.0), T0)
    c.on_reward(reward(a, 1.0), T0 + 1)  # the evaluator's, read later
    cell = c.book.cell(PAIR)
    assert (cell.count, cell.total) == (1, 0.0), (cell.count, cell.total)


def test_a_human_reward_given_by_ids_for_an_expired_attempt_replaces_the_expiry() -> None:
    """The attempt expired (its outcome, failure_value, counted with no trajectory id); the
    human reward by ids (attempt 0) is counted as a second observation instead of replacing."""
    c = core()
    a = assign(c, "t")
    c.on_tick("t", T0 + 5)
    assert c.book.cell(PAIR).count == 1
    c.on_reward(human_by_ids(a, 1.0), T0 + 6)
    cell = c.book.cell(PAIR)
    assert (cell.count, cell.total) == (1, 1.0), (cell.count, cell.total)


# ---------------------------------------------------- the ledger and its retention --
def test_an_unlimited_rewards_retention_keeps_the_ledger() -> None:
    """STORMLINE_TOPIC_RETENTION_MS's own example is -1 (keep for ever). For rewards that
    makes ledger_retention_s -0.001, and the sweep (every 10 s) deletes every task's ledger:
    a redelivered reward counts again, a human reward is added instead of replacing, a
    replayed task is routed again."""
    from stormline.streams.app import router_config

    cfg = router_config(Settings(topic_retention_ms={"rewards": -1}), 1)
    c = RouterCore(cfg, tasks={}, ledger={}, directory=Directory(health=cfg.health))
    c.directory.heartbeat({"x": ["a"]}, [])
    a = assign(c, "t")
    assert c.on_reward(reward(a, 1.0), T0)
    assert c.outcomes.expired(c.ledger.items(), T0 + 20) == [], "swept at once"


class Changelog(MutableMapping[str, Any]):
    """A RocksDB table store and its changelog: every write goes to the local database at once
    and to the changelog only when the batch is flushed; ``kill()`` drops what was not."""

    def __init__(self, local: dict[str, Any], changelog: dict[str, Any]) -> None:
        self.local, self.changelog = local, changelog
        self.buffered: list[tuple[str, Any]] = []

    def __getitem__(self, k: str) -> Any:
        return self.local[k]

    def __setitem__(self, k: str, v: Any) -> None:
        self.local[k] = v
        self.buffered.append((k, v))

    def __delitem__(self, k: str) -> None:
        del self.local[k]
        self.buffered.append((k, None))

    def __iter__(self) -> Iterator[str]:
        return iter(self.local)

    def __len__(self) -> int:
        return len(self.local)

    def flush(self) -> None:
        for k, v in self.buffered:
            if v is None:
                self.changelog.pop(k, None)
            else:
                self.changelog[k] = v
        self.buffered.clear()


def killed_then_restarted(index_first: bool) -> tuple[RouterCore, TaskAssigned]:
    """A worker counts t's reward and is killed (kill -9) after the batch's RocksDB writes,
    before they reached the changelog. It restarts without its RocksDB files (the app drops
    them after a kill: test_the_table_files_a_killed_router_left_are_dropped), from the
    changelog, sees t's reward again, then counts u's. Returns the next owner of the
    partition (a rebalance, or a new pod: from the changelog)."""
    local: dict[str, Any] = {}
    log: dict[str, Any] = {}
    w = Changelog(local, log)
    a1 = core(ledger=w)
    a1.book.own(0, {})
    if index_first:  # the pair had a shard (and the partition's shard index) already
        assert a1.on_reward(reward(assign(a1, "s"), 1.0), T0)
    t = assign(a1, "t")
    w.flush()
    assert a1.on_reward(reward(t, 1.0), T0 + 1)
    w.buffered.clear()  # kill -9 before the flush: only the local files have the writes

    w = Changelog(dict(log), log)  # the restart: local state rebuilt from the changelog
    a2 = core(tasks=dict(a1.tasks), ledger=w)
    a2.book.own(0, a2.outcomes.load_partition(0))
    assert a2.on_reward(reward(t, 1.0), T0 + 2)  # redelivered: counted (it never was, here)
    assert a2.on_reward(reward(assign(a2, "u", T0 + 2), 1.0), T0 + 3)
    w.flush()
    assert a2.book.cell(PAIR).count == 2 + index_first

    b = core(tasks=dict(a2.tasks), ledger=dict(log))
    b.book.own(0, b.outcomes.load_partition(0))
    return b, t


def test_a_shard_index_a_kill_left_only_in_the_local_rocksdb_reaches_the_changelog() -> None:
    """Before, the restarted worker read the partition's shard index from its RocksDB files,
    never wrote it again, and the next owner loaded no shard at all (its statistics of the
    partition started from zero and overwrote the stored ones)."""
    b, _ = killed_then_restarted(index_first=False)
    assert b.book.cell(PAIR).count == 2, "the next owner lost the partition's statistics"


def test_a_ledger_entry_a_kill_left_only_in_the_local_rocksdb_reaches_the_changelog() -> None:
    """Before, the redelivered reward was a 'duplicate' of the entry in the local files and
    wrote nothing: the next owner counted a human correction of t as a new observation."""
    b, t = killed_then_restarted(index_first=True)
    assert b.book.cell(PAIR).count == 3
    b.on_reward(reward(t, 0.0, RewardSource.HUMAN), T0 + 4)
    assert b.book.cell(PAIR).count == 3, "t's human reward was added, not a replacement"


def test_the_table_files_a_killed_router_left_are_dropped(tmp_path: Path) -> None:
    """Files are kept after a clean stop (the mark), dropped after anything else."""
    from stormline.streams.kafka import mark_clean_stop, reset_tables_after_a_kill

    tabledir = tmp_path / "app" / "tables"
    app = SimpleNamespace(conf=SimpleNamespace(tabledir=tabledir))
    (tabledir / "ledger-0.db").mkdir(parents=True)
    mark_clean_stop(app)  # type: ignore[arg-type]
    assert not reset_tables_after_a_kill(app)  # type: ignore[arg-type]
    assert (tabledir / "ledger-0.db").exists()
    # Running now, and killed: no mark.
    assert reset_tables_after_a_kill(app)  # type: ignore[arg-type]
    assert not tabledir.exists()


# --------------------------------------------------------- expiry after a takeover --
def test_attempts_of_a_partition_taken_over_wait_for_its_backlog() -> None:
    """The clocks hold expiries for one heartbeat timeout after a worker *starts*, because
    the results sent meanwhile are still in the backlog (app._grace_until). A worker that
    takes a partition over from a dead one has the same backlog to read, but no hold: its
    first tick expires every attempt that came due while the old owner was dead, blames
    the agents and pays for a second call, before the backlog's results are read."""
    old = core()
    a = assign(old, "t")  # attempt 1, expires at T0 + 5; the owner dies
    new = core(tasks=dict(old.tasks), ledger=dict(old.ledger))
    new.hold_expiry_until = T0 - 100  # started long ago: its own grace is over
    new.adopt(0, list(new.tasks.items()), hold_until=T0 + 6 + 15)  # a rebalance, at T0 + 6
    fx = [new.on_tick(tid, T0 + 6) for tid in new.due(T0 + 6)]
    assert not [e for f in fx for e in f.events], "expired and reassigned at takeover"
    # ... the agent's result, next in the partition's backlog:
    ok = Trajectory(
        task_id="t",
        trajectory_id="t-1",
        attempt=1,
        agent_id=a.agent_id,
        task_type="qa",
        status=TrajectoryStatus.OK,
    )
    new.on_trajectory(ok, T0 + 6.5)
    assert new.tasks["t"]["state"] == "succeeded"


# ------------------------------------------------------------ discounted replace --
def test_a_correction_under_a_discount_keeps_the_mean_in_the_reward_range() -> None:
    """QCell.replace takes the old value out at full weight though it has decayed. With the
    README's kind of settings (gamma 0.99, 8 partitions: 0.923 per shard) a 0 -> 1 human
    correction of an old outcome pushes the mean above 1 (and 1 -> 0 below 0)."""
    c = core(discount=0.99, partitions=8)
    first = assign(c, "t0")
    assert c.on_reward(reward(first, 0.0), T0)
    for i in range(1, 40):
        assert c.on_reward(reward(assign(c, f"t{i}"), 1.0), T0)
    assert c.on_reward(reward(first, 1.0, RewardSource.HUMAN), T0 + 1)
    value = c.book.cell(PAIR).value
    assert 0.0 <= value <= 1.0, value


# ------------------------------------------------- what can never be sent or placed --
def test_an_assignment_the_broker_refuses_fails_its_task_and_blames_nobody() -> None:
    """Before, the task stayed assigned until the attempt expired, the agent (which never saw
    it) was blamed for the expiry, and the task was reassigned, up to max_attempts times."""
    c = core()
    a = assign(c, "t")
    tr, rw = c.cannot_assign("t", a.attempt, "assignment could not be sent: too large", T0).events
    assert isinstance(tr, Trajectory) and tr.final and "too large" in (tr.error or "")
    assert isinstance(rw, Reward) and c.tasks["t"]["state"] == "failed"
    assert c.book.cell(PAIR).count == 0
    assert c.cannot_assign("t", a.attempt, "again", T0 + 1).events == []


def test_the_router_refuses_task_topics_or_own_topics_of_another_partition_count() -> None:
    from stormline.streams.kafka import check_copartitioned, internal_topics

    s = Settings(topic_prefix="x.")

    def md(**counts: int) -> Any:
        return SimpleNamespace(
            topics={
                n: SimpleNamespace(partitions=dict.fromkeys(range(c))) for n, c in counts.items()
            }
        )

    base = {"x.tasks": 4, "x.trajectories": 4, "x.rewards": 4, "x.assignments": 4}
    assert check_copartitioned(s, md(**base)) == 4
    with pytest.raises(
        ValueError, match=r"one partition count \(x.assignments has 4.*x.rewards has 6"
    ):
        check_copartitioned(s, md(**{**base, "x.rewards": 6}))
    changelog = next(w.name for w in internal_topics(s, 4) if w.name.endswith("ledger-changelog"))
    with pytest.raises(ValueError, match="own topics must have 4 partitions"):
        check_copartitioned(s, md(**{**base, changelog: 8}))
