"""Pure tests of the fleet's statistics: shards per partition, snapshots, their sum."""

from __future__ import annotations

import random

import pytest

from stormline.streams.qtable import QCell, cell_key, merge, shard_discount
from stormline.streams.shards import Shard, ShardBook
from stormline.streams.strategies import StrategyConfig, choose_agent

PAIR = cell_key("qa", "x")


def cell(*rewards: float, pulls: int = 0) -> QCell:
    c = QCell(pulls=pulls)
    for r in rewards:
        c.update(r)
    return c


def test_the_fleets_view_is_the_sum_of_every_partitions_shard() -> None:
    book = ShardBook()
    book.put(0, PAIR, Shard(cell(1.0, 1.0)))
    book.snapshot(1, PAIR, cell(0.0, pulls=3))  # another worker's partition
    book.snapshot(2, PAIR, cell(1.0))
    view = book.cell(PAIR)
    assert (view.count, view.successes, view.failures, view.pulls) == (4, 3, 1, 3)
    assert view.value == pytest.approx(0.75)
    # A snapshot of a partition this worker owns is kept, but its own shard counts.
    book.snapshot(0, PAIR, cell(0.0, 0.0, 0.0))
    assert book.cell(PAIR).count == 4


def test_an_older_snapshot_never_replaces_a_newer_one() -> None:
    book = ShardBook()
    book.snapshot(1, PAIR, cell(1.0, 1.0, 0.0))
    book.snapshot(1, PAIR, cell(1.0))  # a former owner's late publication
    assert book.cell(PAIR).count == 3


def test_ownership_moves_between_shard_and_snapshot() -> None:
    book = ShardBook()
    book.snapshot(3, PAIR, cell(1.0))
    book.own(3, {PAIR: Shard(cell(1.0, 0.0))})  # the changelog knows one more
    assert book.cell(PAIR).count == 2
    # ... which the other workers may never have seen: published again at once.
    assert [(p, k, c.count) for p, k, c in book.take_dirty()] == [(3, PAIR, 2)]
    book.pull(3, PAIR)
    assert book.cell(PAIR).pulls == 1 and book.take_dirty() == [(3, PAIR, book.shard(3, PAIR).cell)]
    book.disown(3)  # moved away: the last snapshot counts until the new owner publishes
    assert book.cell(PAIR).count == 1 and book.take_dirty() == []


def test_a_shard_keeps_its_outcome_ids_through_its_stored_form() -> None:
    s = Shard(cell(1.0), ["o1", "o2"])
    assert s.counted("o2") and not s.counted("o3")
    loaded = Shard.from_dict(s.to_dict(7), carry_until=100.0)
    assert loaded.counted("o1") and loaded.carried == ["o1", "o2"] and loaded.recent == []
    assert s.to_dict(7)["p"] == 7
    # Written again before the carry ends, it keeps them; after, only its own.
    loaded.recent = ["o3"]
    assert loaded.to_dict(7)["recent"] == ["o1", "o2", "o3"]
    loaded.written(now=50.0)
    assert loaded.carried == ["o1", "o2"] and loaded.recent == []
    loaded.written(now=150.0)
    assert loaded.carried == [] and not loaded.counted("o1")


def test_merge_keeps_binary_only_when_every_shard_is() -> None:
    assert merge([cell(1.0), cell(0.0)]).binary
    assert not merge([cell(1.0), cell(0.5)]).binary


def test_a_shard_discount_keeps_the_pairs_window_over_its_partitions() -> None:
    """P shards each see ~1/P of a pair's outcomes; each discounts by gamma**P, so the sum
    forgets at the rate one cell with gamma would: drift is followed as fast as configured."""
    assert shard_discount(None, 8) is None and shard_discount(1.0, 8) is None
    gamma, parts = 0.99, 8
    one = QCell()
    shards = [QCell() for _ in range(parts)]
    rng = random.Random(3)
    for i in range(4000):
        r = float(rng.random() < (0.9 if i < 2000 else 0.2))
        one.update(r, gamma)
        shards[rng.randrange(parts)].update(r, shard_discount(gamma, parts))
    assert merge(shards).value == pytest.approx(one.value, abs=0.08)
    assert merge(shards).value < 0.35  # forgot the first 2,000


def test_two_workers_sharing_snapshots_learn_like_one() -> None:
    """Two workers, each owning half the partitions, decide from their own shards plus the
    other's published snapshots (exchanged every 50 tasks here): both find the best agent."""
    probs = {"a": 0.3, "b": 0.8, "c": 0.5}
    books = [ShardBook(), ShardBook()]
    rng, env = random.Random(1), random.Random(2)
    cfg = StrategyConfig(name="thompson")
    picks: list[str] = []
    for i in range(3000):
        p = rng.randrange(8)
        book = books[p % 2]
        cells = {a: book.cell(cell_key("qa", a)) for a in probs}
        agent = choose_agent(cfg, cells, rng, step=i).agent_id
        picks.append(agent)
        shard = book.shard(p, cell_key("qa", agent))
        book.put(
            p,
            cell_key("qa", agent),
            Shard(cell_of(shard).update(float(env.random() < probs[agent]))),
        )
        if i % 50 == 0:
            for src, dst in ((0, 1), (1, 0)):
                for part, pair, c in books[src].take_dirty():
                    books[dst].snapshot(part, pair, QCell.from_dict(c.to_dict()))
    assert picks[-1000:].count("b") >= 900


def cell_of(shard: Shard) -> QCell:
    return QCell.from_dict(shard.cell.to_dict())
