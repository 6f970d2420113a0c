"""Prometheus metrics: every metric Stormline exports (name, type, labels) and ``/metrics``.

Every metric is declared here, once, so that the names, units and labels are in one place
(``deploy/grafana/stormline.json`` is checked against this module). The parts only count:
``metrics.TASKS_ROUTED.labels(...).inc()``. Values that live in objects (in-flight calls,
breaker states, consumer lag, the router's counters) are read at scrape time through
:class:`Watched` families, each source registered with the object that owns it and dropped
when that object is garbage (a weak reference), so a test that builds many workers in one
process does not leak them.

:func:`serve` starts the exporter of one process on ``STORMLINE_METRICS_PORT`` (0: off);
the router also serves ``/metrics`` on its Faust web port (Faust's own Prometheus sensor,
``faust_*`` names, beside these). Names follow Prometheus' conventions: ``stormline_``
prefix, base units (seconds, USD), ``_total`` on counters (prometheus-client appends it).

Label values are bounded sets (agents, task types, providers, outcomes, tables, topics):
never a task id.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Literal

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["Watched", "serve", "serving_port"]

log = logging.getLogger("stormline.metrics")
disable_created_metrics()  # no *_created series: half the lines, nothing a dashboard reads

# LLM calls take from a few ms (a cache, the simulator) to minutes (a long completion).
LLM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# ---------------------------------------------------------------------------- service --
SERVICE_INFO = Gauge(
    "stormline_service_info", "1 per Stormline process serving metrics", ["service"]
)

# ----------------------------------------------------------------------------- router --
TASKS_ROUTED = Counter(
    "stormline_router_tasks_routed",
    "Assignments the router sent (Kafka acknowledged), reassignments included",
    ["task_type", "agent", "strategy"],
)

# ----------------------------------------------------------------------------- worker --
LLM_CALLS = Counter(
    "stormline_llm_calls",
    "Requests to LLM providers by outcome: ok, or the error kind (timeout = the try's "
    "timeout cut it; cancelled = a shutdown did)",
    ["agent", "provider", "outcome"],
)
LLM_LATENCY = Histogram(
    "stormline_llm_call_duration_seconds",
    "Duration of one request to an LLM provider, whatever its outcome",
    ["agent", "provider"],
    buckets=LLM_BUCKETS,
)
LLM_TOKENS = Counter(
    "stormline_llm_tokens",
    "Tokens LLM providers reported, by kind (prompt, completion)",
    ["agent", "provider", "kind"],
)
LLM_COST = Counter(
    "stormline_llm_cost_usd",
    "Cost of the LLM answers (agents.yaml prices x reported tokens), USD",
    ["agent", "provider"],
)
LLM_RETRIES = Counter(
    "stormline_llm_retries",
    "Requests beyond the first of one LLM call (its retries)",
    ["agent", "provider"],
)
TRAJECTORIES = Counter(
    "stormline_worker_trajectories",
    "Trajectories workers delivered, by status (ok, error, timeout)",
    ["agent", "status"],
)
EXPIRED = Counter(
    "stormline_worker_expired_attempts",
    "LLM calls of attempts that had expired: not_called (skipped before the call went "
    "out) or answered_late (answered after expiry: maybe paid twice)",
    ["kind"],
)

# --------------------------------------------------------------------------- evaluator --
REWARDS = Histogram(
    "stormline_reward_value",
    "Reward values the evaluator produced (count, sum and distribution)",
    ["task_type", "agent", "source"],
    buckets=(-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 0.9, 1.0),
)

# -------------------------------------------------------------------------------- sink --
SINK_ROWS = Counter("stormline_sink_rows_written", "Rows the sink wrote to ClickHouse", ["table"])
SINK_FAILURES = Counter(
    "stormline_sink_write_failures", "Failed writes of a batch (each retried)", []
)

# ----------------------------------------------------------------------------- trainer --
TRAINER_UPDATES = Counter("stormline_trainer_updates", "Training updates finished", [])
TRAINER_PROMOTIONS = Counter(
    "stormline_trainer_promotion_decisions",
    "Promotion gate decisions of new checkpoints (promoted, rejected)",
    ["decision"],
)
TRAINER_EXPERIENCES = Counter(
    "stormline_trainer_experiences_trained", "Experiences the updates trained on", []
)
TRAINER_UPDATE_SECONDS = Histogram(
    "stormline_trainer_update_duration_seconds",
    "Duration of one update (train, checkpoint, gate)",
    [],
    buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)

# --------------------------------------------------------------------------------- api --
TASKS_SUBMITTED = Counter(
    "stormline_api_tasks_submitted",
    "Tasks the HTTP API published (Kafka acknowledged)",
    ["task_type"],
)

# ---------------------------------------------------------------------------- any part --
DEAD_LETTERS = Counter(
    "stormline_dead_letters",
    "Records sent to dead-letters, by reason (framing, avro, unknown-schema, validation, "
    "oversize, handler) and source topic (without the topic prefix)",
    ["reason", "topic"],
)


# ======================================================================== scrape-time ==
Sample = tuple[tuple[str, ...], float]


@dataclass(eq=False)
class Watched(Collector):
    """A family read at scrape time: each source is ``fn(owner)`` yielding (labels, value).

    Samples of the same labels from several sources are summed (two workers in one process
    report one in-flight gauge). A source whose owner is gone is dropped; one that raises
    (a closed consumer) is left out of that scrape.
    """

    name: str
    documentation: str
    labels: list[str]
    kind: Literal["gauge", "counter"] = "gauge"
    _sources: dict[int, tuple[weakref.ref[Any], Callable[[Any], Iterable[Sample]]]] = field(
        default_factory=dict
    )
    # Reentrant: a weak reference's callback (garbage collected mid-scrape) takes it too.
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        REGISTRY.register(self)

    def watch(self, owner: object, fn: Callable[[Any], Iterable[Sample]]) -> None:
        """Report ``fn(owner)`` while ``owner`` lives. ``fn`` must not hold ``owner`` itself
        (pass it the owner instead), or the owner never dies."""
        key = id(owner)

        def gone(_: object, key: int = key) -> None:
            with self._lock:
                self._sources.pop(key, None)

        with self._lock:
            self._sources[key] = (weakref.ref(owner, gone), fn)

    def unwatch(self, owner: object) -> None:
        with self._lock:
            self._sources.pop(id(owner), None)

    def samples(self) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        # Under the lock throughout: once unwatch() returns, no scrape still reads the owner
        # (a consumer is unwatched before it closes). Sources are local reads, quick.
        with self._lock:
            for ref, fn in list(self._sources.values()):
                owner = ref()
                if owner is None:
                    continue
                try:
                    got = list(fn(owner))
                except Exception:  # a closed client, a table mid-rebalance: next scrape
                    continue
                for labels, value in got:
                    out[labels] = out.get(labels, 0.0) + float(value)
        return out

    def collect(self) -> Iterator[Metric]:
        cls = GaugeMetricFamily if self.kind == "gauge" else CounterMetricFamily
        family = cls(self.name, self.documentation, labels=self.labels)
        for labels, value in sorted(self.samples().items()):
            family.add_metric(list(labels), value)
        yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())  # dynamic: the registry must not call collect() at register time


BREAKER_STATE = Watched(
    "stormline_llm_breaker_state",
    "Circuit breaker of each provider endpoint a worker calls: 0 closed, 1 half-open, 2 open",
    ["endpoint"],
)
IN_FLIGHT = Watched("stormline_worker_in_flight", "Assignments a worker is handling now", [])
CONSUMER_LAG = Watched(
    "stormline_consumer_lag",
    "Records behind the end of each assigned partition (high watermark - committed offset), "
    "per consumer group, as its consumer last saw it (every 5 s)",
    ["group", "topic", "partition"],
)
ROUTER_EVENTS = Watched(
    "stormline_router_events",
    "The router core's counters since this router started (tasks, assigned, expired, "
    "reassigned, failed_no_agent, waiting, probes, rewards_applied, ...)",
    ["event"],
    kind="counter",
)
AGENT_STATUS = Watched(
    "stormline_router_agent_status",
    "1 for each agent's current health status as the router sees it (healthy, degraded, "
    "down, unknown)",
    ["agent", "status"],
)
CHECKPOINT_LOADS = Watched(
    "stormline_router_checkpoint_loads",
    "Checkpoints the router loaded (outcome=loaded) or could not load (failed; retried)",
    ["outcome"],
    kind="counter",
)
TRAINER_BUFFERED = Watched(
    "stormline_trainer_buffered_experiences", "Experiences waiting for the next update", []
)

BREAKER_CODES = {"closed": 0, "half_open": 1, "open": 2}


# ============================================================================ helpers ==
@dataclass
class _Call:
    agent: str
    provider: str
    timeout_s: float | None
    outcome: str = "ok"

    def usage(self, prompt_tokens: int, completion_tokens: int, cost_usd: float) -> None:
        LLM_TOKENS.labels(self.agent, self.provider, "prompt").inc(prompt_tokens)
        LLM_TOKENS.labels(self.agent, self.provider, "completion").inc(completion_tokens)
        if cost_usd > 0:
            LLM_COST.labels(self.agent, self.provider).inc(cost_usd)


@contextmanager
def llm_call(agent: str, provider: str, timeout_s: float | None = None) -> Iterator[_Call]:
    """Count one request to a provider and time it; the outcome comes from its exception:
    a ``kind`` attribute (ProviderError's), ``timeout``, or ``cancelled``. A cancellation at
    the try's timeout (``asyncio.wait_for`` cancels the request) counts as a timeout."""
    call = _Call(agent, provider, timeout_s)
    t0 = perf_counter()
    try:
        yield call
    except BaseException as exc:
        call.outcome = _outcome(exc, perf_counter() - t0, timeout_s)
        raise
    finally:
        LLM_CALLS.labels(agent, provider, call.outcome).inc()
        LLM_LATENCY.labels(agent, provider).observe(perf_counter() - t0)


def _outcome(exc: BaseException, elapsed: float, timeout_s: float | None) -> str:
    kind = getattr(exc, "kind", None)
    if kind is not None:
        return str(getattr(kind, "value", kind))
    if isinstance(exc, TimeoutError):
        return "timeout"
    if type(exc).__name__ == "CancelledError":
        near = timeout_s is not None and elapsed >= 0.95 * timeout_s
        return "timeout" if near else "cancelled"
    return "error"


# How often a group consumer's librdkafka reports its statistics (lag among them).
LAG_INTERVAL_MS = 5000


def lag_from_stats(stats_json: str) -> dict[tuple[str, int], int]:
    """Per-partition lag from a librdkafka statistics report (``stats_cb``, delivered on the
    consumer's own thread inside ``consume``: no cross-thread client call at scrape time,
    which can block on the group's queue).

    The lag is librdkafka's ``consumer_lag`` (high watermark - committed offset); before the
    group's first commit on a partition, the high watermark minus the read position, or
    minus the log start (where ``auto.offset.reset=earliest`` starts). Partitions this
    consumer does not fetch (unassigned, stopped) are left out.
    """
    out: dict[tuple[str, int], int] = {}
    for topic, t in json.loads(stats_json).get("topics", {}).items():
        for p in t.get("partitions", {}).values():
            part = int(p.get("partition", -1))
            if part < 0 or p.get("fetch_state") in (None, "none", "stopping", "stopped"):
                continue  # -1 is librdkafka's internal "unassigned" partition
            lag = int(p.get("consumer_lag", -1))
            hi = int(p.get("hi_offset", -1))
            if lag < 0 and hi >= 0:
                pos = int(p.get("app_offset", -1))
                lag = hi - (pos if pos >= 0 else max(0, int(p.get("lo_offset", 0))))
            if lag >= 0:
                out[(topic, part)] = lag
    return out


def lag_of(consumer: Any) -> Iterator[Sample]:
    """Samples of a consumer holding ``group_id`` and ``lag`` (as :func:`lag_from_stats`)."""
    for (topic, partition), lag in list(consumer.lag.items()):
        yield (consumer.group_id, topic, str(partition)), lag


# ============================================================================ exporter ==
_served: dict[str, int] = {}
_serve_lock = threading.Lock()


def serve(port: int, service: str, host: str = "127.0.0.1") -> int | None:
    """Serve this process's ``/metrics`` on ``host:port`` (a daemon thread); 0 = off.

    Idempotent per process. Returns the port, or None when off or the port is taken (then
    the service runs on and says so: metrics are not worth a crash loop).
    """
    SERVICE_INFO.labels(service).set(1)
    if port <= 0:
        return None
    from prometheus_client import start_http_server

    with _serve_lock:
        if "port" in _served:
            return _served["port"]
        try:
            start_http_server(port, addr=host)
        except OSError as exc:
            log.error("metrics not served: %s:%d: %s", host, port, exc)
            return None
        _served["port"] = port
    log.info("metrics on http://%s:%d/metrics", host, port)
    return port


def serving_port() -> int | None:
    """The port :func:`serve` serves on in this process, if any."""
    return _served.get("port")
