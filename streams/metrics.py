"""The router's Prometheus metrics: Faust's own sensor plus Stormline's router families.

:func:`instrument` (``run_router`` calls it) puts Faust's Prometheus monitor on the app
(``faust_*``: messages in and out, per-topic offsets, rebalances, commit latency, ...), serves
``/metrics`` on the router's web port, and registers the scrape-time families of
:mod:`stormline.metrics` that read this router: the core's counters
(``stormline_router_events_total``), each agent's health status, checkpoint loads, and the
consumer lag of the router's group from the offsets Faust's monitor tracks. The routed
counter (task type, agent, strategy) is counted where an assignment is acknowledged
(``Router.emit``).

Faust's metrics are created once per process (prometheus-client refuses a name twice), so a
second Router in one process (tests) shares them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from stormline import metrics

# The router is typed Any here: importing streams.app for its type would be an import cycle.
Router = Any

FAUST_PREFIX = "faust"  # faust_messages_received_total, ...: not the app id (it has the prefix)
_faust_metrics: list[Any] = []


def instrument(router: Router) -> None:
    """Faust's Prometheus sensor on ``router.app``, its ``/metrics`` page, our families."""
    from aiohttp.web import Response
    from faust.sensors.prometheus import FaustMetrics, PrometheusMonitor

    if not _faust_metrics:
        _faust_metrics.append(FaustMetrics.create(REGISTRY, FAUST_PREFIX))
    router.app.monitor = PrometheusMonitor(metrics=_faust_metrics[0])

    @router.app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        body = generate_latest(REGISTRY)
        return Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    metrics.ROUTER_EVENTS.watch(router, _events)
    metrics.AGENT_STATUS.watch(router, _agents)
    metrics.CHECKPOINT_LOADS.watch(router, _checkpoints)
    metrics.CONSUMER_LAG.watch(router, _lag)


def _events(router: Router) -> Iterator[metrics.Sample]:
    for name, value in list(router.core.counters.items()):
        yield (name,), value
    yield ("dead_letters",), router.extra["dead_letters"]


def _agents(router: Router) -> Iterator[metrics.Sample]:
    d = router.directory
    for agent in sorted({*d.capabilities, *d.budgets}):
        yield (agent, d.status(agent).value), 1


def _checkpoints(router: Router) -> Iterator[metrics.Sample]:
    yield ("loaded",), router.extra["policy_loads"]
    yield ("failed",), router.extra["policy_load_failures"]


def _lag(router: Router) -> Iterator[metrics.Sample]:
    """End offset - committed offset of each partition the router's group reads (Faust's
    monitor learns end offsets with every fetch and committed ones with every commit)."""
    monitor = router.app.monitor
    ends, committed = monitor.tp_end_offsets, monitor.tp_committed_offsets
    group = router.app.conf.id
    for tp, end in list(ends.items()):
        done = committed.get(tp)
        if done is not None:
            yield (group, tp.topic, str(tp.partition)), max(0, end - done)
