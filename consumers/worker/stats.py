"""The worker's counters (read by tests, the benchmark and the heartbeats)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WorkerStats:
    processed: int = 0
    errors: int = 0
    resent: int = 0
    llm_calls: int = 0
    cache_hits: int = 0
    in_flight: int = 0
    in_flight_max: int = 0
    first_started: float = 0.0
    last_done: float = 0.0
