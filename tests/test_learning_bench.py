"""bench/learning.py's pure parts: the environments, the metrics, the in-process loop."""

from __future__ import annotations

import math
import os
import subprocess
import sys

from bench import percentile
from bench.learning import (
    DRIFT,
    FLAKY,
    FLEET,
    ROOT,
    Pick,
    play,
    regret,
    share,
    tasks_to_switch,
)


def test_environments_value_errors_at_zero_and_drift_from_the_switch() -> None:
    assert FLAKY.value("flaky", "math") == 0.5  # half errors (0), the rest right
    assert FLAKY.value("steady", "math") == 0.8
    assert FLAKY.best("math") == "steady"
    assert DRIFT.best("math") == "was-best"
    assert DRIFT.best("math", drifted=True) == "new-best"
    assert math.isclose(DRIFT.value("was-best", "math", drifted=True), 0.5)
    assert FLEET.best("math") == "agent-0" and len(FLEET.agents) == 5
    cfg = FLAKY.sim_config("flaky", seed=3)
    assert cfg["models"]["sim-flaky"] == {"skill": {"math": 1.0}, "error_rate": 0.5}
    drifted = DRIFT.sim_config("was-best", seed=3, drifted=True)
    assert drifted["models"]["sim-was-best"]["skill"] == {"math": 0.5}
    assert "error_rate" not in drifted["models"]["sim-was-best"]


def test_regret_and_share_skip_tasks_never_decided() -> None:
    picks: list[Pick] = [("math", "steady"), None, ("math", "flaky"), ("math", "steady")]
    assert math.isclose(regret(FLAKY, picks), 0.3)  # one flaky pick: 0.8 - 0.5
    assert share(picks, "steady", 3) == 0.5  # of the last 3, one is missing
    assert share(picks, {"math": "steady"}, 10) == 2 / 3
    assert share([None], "steady", 1) == 0.0
    # After the drift the best agent is another one, and so is the regret.
    drift: list[Pick] = [("math", "was-best"), ("math", "was-best")]
    assert math.isclose(regret(DRIFT, drift, drift_at=1), 0.2)


def test_tasks_to_switch_counts_from_the_drift_until_80_of_the_last_100() -> None:
    old: list[Pick] = [("math", "was-best")] * 150
    new: list[Pick] = [("math", "new-best")] * 200
    # Switched 50 tasks after the drift; 80 of the last 100 are new-best 80 tasks later.
    assert tasks_to_switch(old + new, 100, "new-best") == 50 + 80
    assert tasks_to_switch(old + new, 150, "new-best") == 80  # an instant switch: the floor
    assert tasks_to_switch(old, 50, "new-best") == 100  # never: the tasks left
    # Tasks never decided (None) are not in the window's count.
    gaps: list[Pick] = [None if i % 2 else ("math", "new-best") for i in range(100)]
    assert tasks_to_switch(old[:100] + gaps, 100, "new-best") < 100
    assert percentile([3, 1, 2], 50) == 2 and math.isnan(percentile([], 50))


def test_in_process_loop_learns_and_reassigns_errors_on_the_router_api() -> None:
    picks = play(FLAKY, n=600, seed=3, lag=0)
    assert len(picks) == 600 and all(p is not None for p in picks)
    assert share(picks, "steady", 200) > 0.9
    # Lagged feedback still decides every task; errors are reassigned, never lost.
    assert len(play(FLEET, "random", n=100, seed=3, lag=20)) == 100
    # Per-task lags (an e2e run's, in task order) replay as given: all late, nothing learned
    # before the first results land, the same as one fixed lag.
    fixed = play(FLAKY, n=300, seed=3, lag=50)
    assert play(FLAKY, n=300, seed=3, lag=[50.0] * 300) == fixed


def test_seeded_runs_do_not_depend_on_the_process_hash_seed() -> None:
    # Thompson draws in the candidates' order; the bench registers agents in sorted order.
    runs = [
        subprocess.run(
            [sys.executable, "-c", "from bench.learning import *; print(play(FLEET, n=200))"],
            env={**os.environ, "PYTHONHASHSEED": str(h)},
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
        for h in (1, 2)
    ]
    assert runs[0] == runs[1] and runs[0]
