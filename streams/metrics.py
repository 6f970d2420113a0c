"""The router's Prometheus metrics: Faust's own sensor plus Stormline's router families.

:func:`instrument` (``run_router`` calls it) puts Faust's Prometheus monitor on the app
(``faust_*``: messages in and out, per-topic offsets, rebalances, commit latency, ...), serves
``/metrics`` on the router's web port, and registers the scrape-time families of
:mod:`stormline.metrics` that read this router: the core's counters
(``stormline_router_events_total``), each agent's health status, checkpoint loads, and the
consumer lag of the router's group from the offsets Faust's monitor tracks. The routed
counter (task type, agent, strategy) is counted where an assignment is acknowledged
(``Router._send``).

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


def _monitor(metrics: Any) -> Any:
    """Faust's PrometheusMonitor, with each labelled child looked up once.

    Its hooks run per message, per stream event and per table read and write, and each asks
    ``Metric.labels(...)`` anew: a lock and a dict of label tuples, ~0.3 ms of the router's
    CPU per task (a py-spy profile of ``bench/router.py --profile``). The children do not
    change, so they are kept here; the figures are Faust's own.
    """
    from faust.sensors.monitor import Monitor
    from faust.sensors.prometheus import PrometheusMonitor

    class CachedMonitor(PrometheusMonitor):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self._labelled: dict[tuple[Any, ...], Any] = {}

        def _child(self, metric: Any, **labels: Any) -> Any:
            key = (id(metric), *labels.items())
            child = self._labelled.get(key)
            if child is None:
                child = self._labelled[key] = metric.labels(**labels)
            return child

        def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
            Monitor.on_message_in(self, tp, offset, message)
            m = self._metrics
            m.messages_received.inc()
            m.active_messages.inc()
            self._child(m.messages_received_per_topics, topic=tp.topic).inc()
            per_tp = m.messages_received_per_topics_partition
            self._child(per_tp, topic=tp.topic, partition=tp.partition).set(offset)

        def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> Any:
            state = Monitor.on_stream_event_in(self, tp, offset, stream, event)
            m = self._metrics
            m.total_events.inc()
            m.total_active_events.inc()
            label = f"stream.{self._stream_label(stream)}.events"
            self._child(m.total_events_per_stream, stream=label).inc()
            return state

        def _table(self, table: Any, operation: str) -> None:
            ops = self._metrics.table_operations
            self._child(ops, table=f"table.{table.name}", operation=operation).inc()

        def on_table_get(self, table: Any, key: Any) -> None:
            Monitor.on_table_get(self, table, key)
            self._table(table, self.KEYS_RETRIEVED)

        def on_table_set(self, table: Any, key: Any, value: Any) -> None:
            Monitor.on_table_set(self, table, key, value)
            self._table(table, self.KEYS_UPDATED)

        def on_table_del(self, table: Any, key: Any) -> None:
            Monitor.on_table_del(self, table, key)
            self._table(table, self.KEYS_DELETED)

        def on_send_initiated(
            self, producer: Any, topic: str, message: Any, keysize: int, valsize: int
        ) -> Any:
            self._child(self._metrics.topic_messages_sent, topic=f"topic.{topic}").inc()
            return Monitor.on_send_initiated(self, producer, topic, message, keysize, valsize)

    return CachedMonitor(metrics=metrics)


def instrument(router: Router) -> None:
    """Faust's Prometheus sensor on ``router.app``, its ``/metrics`` page, our families."""
    from aiohttp.web import Response
    from faust.sensors.prometheus import FaustMetrics

    if not _faust_metrics:
        _faust_metrics.append(FaustMetrics.create(REGISTRY, FAUST_PREFIX))
    router.app.monitor = _monitor(_faust_metrics[0])

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
