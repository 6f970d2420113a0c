"""The worker's counters (read by tests, the benchmark and the heartbeats)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WorkerStats:
    processed: int = 0
    errors: int = 0
    resent: int = 0
    llm_calls: int = 0
    expired_skipped: int = 0  # calls not made: the attempt expired while it waited
    expired_calls: int = 0  # calls answered after their attempt expired (maybe paid twice)
    dead_letters: int = 0  # assignments that ended as a dead letter, not a trajectory
    redis_refused: int = 0  # Redis commands refused (OOM, READONLY...), set on shutdown
    cache_hits: int = 0
    in_flight: int = 0
    in_flight_max: int = 0
    first_started: float = 0.0
    last_done: float = 0.0
