"""One trace per task, publish to reward, its spans in order (issue 18).

* In process, with the SDK's in-memory exporter: the real publish, worker and evaluator
  code on the test's topics, and the router's hop as ``streams/app.py`` does it (its pure
  core inside a span continued from the task's headers; the Faust wiring itself runs in the
  test below). Parent links are checked span by span.
* Across processes: `stormline publish`, the router, a worker and the evaluator as real
  processes with ``STORMLINE_OTEL_EXPORTER=otlp`` pointed at an OTLP/HTTP receiver in this
  test (protobuf ``ExportTraceServiceRequest`` decoded with opentelemetry-proto): one trace
  id per task, every span of it, ordered by start time, from the right service.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from stormline import tracing
from stormline.consumers.evaluator.service import EvaluatorService
from stormline.consumers.llm.agents import parse_registry
from stormline.consumers.worker.service import Worker
from stormline.deploy.demo_tasks import demo_tasks
from stormline.producers.publish import publish_tasks
from stormline.schemas.catalog import TASKS
from stormline.schemas.kafka import EventConsumer, EventProducer
from stormline.schemas.serde import Serde
from stormline.settings import Settings
from stormline.streams.health import Directory
from stormline.streams.router import RouterConfig, RouterCore
from tests.conftest import free_port, settings_env, wait_until
from tests.loop import Loop

# The spans of one task, in the order they start.
CHAIN = [
    "stormline.publish",
    "stormline.router.route",
    "stormline.worker.assignment",
    "chat",  # "chat <model>": the GenAI client span of the LLM call
    "stormline.worker.trajectory",
    "stormline.evaluator.score",
    "stormline.evaluator.reward",
]
# Each span's parent in the chain (the chat span and the reward hang off siblings).
PARENT = {
    "stormline.router.route": "stormline.publish",
    "stormline.worker.assignment": "stormline.router.route",
    "chat": "stormline.worker.assignment",
    "stormline.worker.trajectory": "stormline.worker.assignment",
    "stormline.evaluator.score": "stormline.worker.trajectory",
    "stormline.evaluator.reward": "stormline.worker.trajectory",
}


@dataclass(frozen=True)
class S:
    """A finished span, from either exporter: what the assertions read."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str | None
    start: int
    attributes: dict[str, Any]
    service: str

    @property
    def step(self) -> str:
        return "chat" if self.name.startswith("chat ") else self.name


def traces_by_task(spans: list[S]) -> dict[str, dict[str, list[S]]]:
    """task id -> trace id -> its spans (the task id from any span of the trace)."""
    task_of: dict[str, str] = {}
    for sp in spans:
        if "stormline.task_id" in sp.attributes:
            task_of.setdefault(sp.trace_id, str(sp.attributes["stormline.task_id"]))
    out: dict[str, dict[str, list[S]]] = defaultdict(lambda: defaultdict(list))
    for sp in spans:
        if sp.trace_id in task_of:
            out[task_of[sp.trace_id]][sp.trace_id].append(sp)
    return out


def check_chain(task_id: str, traces: dict[str, list[S]]) -> list[S]:
    """One trace for the task; its first attempt's spans all there, linked and in order."""
    assert len(traces) == 1, f"task {task_id}: {len(traces)} traces: " + "; ".join(
        f"{tid}: {[(s.service, s.name, s.parent_id) for s in sorted(tr, key=lambda s: s.start)]}"
        for tid, tr in traces.items()
    )
    spans = next(iter(traces.values()))
    first: dict[str, S] = {}
    for sp in sorted(spans, key=lambda s: s.start):
        first.setdefault(sp.step, sp)
    missing = [n for n in CHAIN if n not in first]
    assert not missing, f"task {task_id}: no {missing} in {[s.name for s in spans]}"
    chain = [first[n] for n in CHAIN]
    starts = [sp.start for sp in chain]
    assert starts == sorted(starts) and len(set(starts)) == len(starts), (
        f"task {task_id}: spans out of order: {[(s.name, s.start) for s in chain]}"
    )
    assert first["stormline.publish"].parent_id is None  # the root
    by_id = {sp.span_id: sp for sp in spans}
    for name, parent in PARENT.items():
        got = by_id.get(first[name].parent_id or "")
        assert got is not None and got.step == parent, (
            f"task {task_id}: {name}'s parent is {got.name if got else None}, not {parent}"
        )
    chat = first["chat"].attributes
    assert chat["gen_ai.operation.name"] == "chat" and chat["gen_ai.request.model"]
    assert chat["gen_ai.system"] in ("simulated", "openai"), chat
    if chat.get("gen_ai.usage.input_tokens") is not None:
        assert int(chat["gen_ai.usage.input_tokens"]) > 0
        assert int(chat["gen_ai.usage.output_tokens"]) > 0
    return chain


# ----------------------------------------------------------------------- in process --
def _in_memory(exporter: InMemorySpanExporter) -> list[S]:
    out = []
    for sp in exporter.get_finished_spans():
        ctx, parent = sp.get_span_context(), sp.parent
        out.append(
            S(
                sp.name,
                format(ctx.trace_id, "032x"),
                format(ctx.span_id, "016x"),
                format(parent.span_id, "016x") if parent is not None else None,
                int(sp.start_time or 0),
                dict(sp.attributes or {}),
                str(sp.resource.attributes.get("service.name")),
            )
        )
    return out


@pytest.fixture
def memory_tracing(topics: Settings) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.setup(topics, "test", exporter=exporter, batch=False)
    try:
        yield exporter
    finally:
        tracing.shutdown()


def _route(s: Settings, serde: Serde, n: int) -> None:
    """The router's hop as streams/app.py does it: each task's span continues the trace in
    its headers, and the assignment produced inside it carries that span's context."""
    directory = Directory()
    directory.heartbeat({"agent-0": ["math", "reverse", "upper", "sort"]}, ["agent-0"])
    core = RouterCore(RouterConfig(), tasks={}, ledger={}, directory=directory)
    consumer = EventConsumer(s, serde, s.topic("route-stand-in"), [TASKS])
    out = EventProducer(s, serde)
    seen = 0
    try:
        deadline = time.monotonic() + 60
        while seen < n and time.monotonic() < deadline:
            for rec in consumer.poll_batch(100, 0.5):
                attrs = {"stormline.task_id": rec.event.task_id}
                with tracing.continued("stormline.router.route", rec.headers, attrs):
                    for ev in core.on_task(rec.event, time.time()):
                        out.produce(ev)
                seen += 1
        out.flush()
    finally:
        consumer.close()
        out.close()
    assert seen == n


@pytest.mark.timeout(240)
def test_one_trace_per_task_in_process(
    topics: Settings, memory_tracing: InMemorySpanExporter
) -> None:
    s = topics
    serde = Serde.from_settings(s)
    tasks = list(demo_tasks(4, seed=5))
    report = publish_tasks(s, tasks, mark_submitted=False)
    assert report.sent == len(tasks)
    _route(s, serde, len(tasks))
    registry = parse_registry(
        {
            "agents": [
                {
                    "id": "agent-0",
                    "provider": "simulated",
                    "model": "sim-generalist",
                    "capabilities": ["math", "reverse", "upper", "sort"],
                }
            ]
        }
    )
    worker = Worker(s, registry, "w-trace", serde=serde)
    stats = asyncio.run(worker.run(until=lambda w: w.stats.processed >= len(tasks)))
    assert stats.processed == len(tasks)
    evaluator = EvaluatorService(s)
    try:
        rewards = 0
        deadline = time.monotonic() + 60
        while rewards < len(tasks) and time.monotonic() < deadline:
            rewards += evaluator.step()
    finally:
        evaluator.close()
    assert rewards == len(tasks)
    by_task = traces_by_task(_in_memory(memory_tracing))
    assert set(by_task) == {t.task_id for t in tasks}
    trace_ids = {next(iter(tr)) for tr in by_task.values()}
    assert len(trace_ids) == len(tasks)  # one trace per task, none shared
    for task_id, traces in by_task.items():
        check_chain(task_id, traces)


def test_an_api_request_is_one_trace_for_its_tasks(
    topics: Settings, memory_tracing: InMemorySpanExporter
) -> None:
    """The API's publisher: one root span per request, every task of it under that span."""
    from stormline.api.publisher import BatchPublisher

    serde = Serde.from_settings(topics)
    tasks = list(demo_tasks(3, seed=2))
    producer = EventProducer(topics, serde)
    try:
        asyncio.run(BatchPublisher(topics, producer).publish(tasks))
    finally:
        producer.close()
    (root,) = [sp for sp in _in_memory(memory_tracing) if sp.name == "stormline.publish"]
    assert root.attributes["stormline.tasks"] == 3 and root.parent_id is None
    consumer = EventConsumer(topics, serde, topics.topic("api-trace"), [TASKS])
    got: list[Any] = []
    try:
        wait_until(lambda: got.extend(consumer.poll_batch(10, 0.5)) or len(got) >= 3, 30, "tasks")
    finally:
        consumer.close()
    for rec in got:
        ctx = trace.get_current_span(tracing.extract(rec.headers)).get_span_context()
        assert (format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")) == (
            root.trace_id,
            root.span_id,
        )


def test_tracing_off_costs_no_headers_and_no_spans(topics: Settings) -> None:
    """Off (the default), nothing is added to records and the helpers are shared no-ops."""
    tracing.shutdown()
    assert not tracing.enabled()
    assert tracing.inject() is None and tracing.inject([("x", b"1")]) == [("x", b"1")]
    assert tracing.root("a") is tracing.continued("b", None) is tracing.llm_call("s", "m")
    serde = Serde.from_settings(topics)
    task = next(demo_tasks(1))
    EventProducer(topics, serde).publish([task])
    consumer = EventConsumer(topics, serde, topics.topic("off"), [TASKS])
    try:
        got = []
        wait_until(lambda: got.extend(consumer.poll_batch(10, 0.5)) or got, 30, "the task")
    finally:
        consumer.close()
    assert got[0].headers is None


def test_headers_round_trip_every_client_shape() -> None:
    exporter = InMemorySpanExporter()
    tracing.setup(Settings(), "test", exporter=exporter, batch=False)
    try:
        with tracing.root("r") as span:
            headers = tracing.inject([("traceparent", b"stale"), ("k", b"v")])
        assert headers is not None and headers[0] == ("k", b"v")
        want = span.get_span_context()
        for shape in (
            headers,
            tuple(headers),
            dict(headers),
            [(k, v.decode()) for k, v in headers],
        ):
            ctx = tracing.extract(shape)
            assert ctx is not None
            got = trace.get_current_span(ctx).get_span_context()
            assert (got.trace_id, got.span_id) == (want.trace_id, want.span_id)
        assert tracing.extract([("traceparent", b"00-bad")]) is None
        assert tracing.extract([("k", b"v")]) is None and tracing.extract(None) is None
    finally:
        tracing.shutdown()


# -------------------------------------------------------------------- across processes --
class OtlpReceiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces, protobuf in, spans kept."""

    def __init__(self) -> None:
        self.spans: list[S] = []
        self.requests = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb

                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.headers.get("content-encoding") == "gzip":
                    import gzip

                    body = gzip.decompress(body)
                req = pb.ExportTraceServiceRequest.FromString(body)
                outer.add(req)
                reply = pb.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, req: Any) -> None:
        got = []
        for rs in req.resource_spans:
            service = next(
                (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"),
                "",
            )
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    attrs = {a.key: _value(a.value) for a in sp.attributes}
                    got.append(
                        S(
                            sp.name,
                            sp.trace_id.hex(),
                            sp.span_id.hex(),
                            sp.parent_span_id.hex() or None,
                            int(sp.start_time_unix_nano),
                            attrs,
                            service,
                        )
                    )
        with self.lock:
            self.requests += 1
            self.spans += got

    def close(self) -> None:
        self.server.shutdown()


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()


def otel_env(receiver: OtlpReceiver) -> dict[str, str]:
    return {
        "STORMLINE_OTEL_EXPORTER": "otlp",
        "STORMLINE_OTEL_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # export within a fraction of a second
    }


@pytest.mark.timeout(600)
def test_one_trace_per_task_across_processes(
    stack_settings: Settings, tmp_path: Path, receiver: OtlpReceiver
) -> None:
    env = otel_env(receiver)
    with Loop(stack_settings, tmp_path, workers=1, extra_env=env) as loop:
        tasks = list(demo_tasks(6, seed=11))
        source = tmp_path / "tasks.jsonl"
        source.write_text("".join(t.model_dump_json() + "\n" for t in tasks))
        published = subprocess.run(
            [sys.executable, "-m", "stormline.cli", "publish", str(source), "--json"],
            env={**settings_env(loop.s), **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert published.returncode == 0, published.stderr[-2000:]
        assert json.loads(published.stdout)["sent"] == len(tasks)
        loop.tasks += tasks
        outcomes = loop.wait_outcomes(timeout=300, settle=30)
        assert not outcomes.missing({t.task_id for t in tasks})

        def complete() -> bool:
            with receiver.lock:
                spans = list(receiver.spans)
            by_task = traces_by_task(spans)
            return all(
                {sp.step for tr in by_task.get(t.task_id, {}).values() for sp in tr} >= set(CHAIN)
                for t in tasks
            )

        wait_until(complete, timeout=60, what="every task's spans at the receiver")
    by_task = traces_by_task(receiver.spans)
    services = {
        "stormline.publish": "stormline-publish",
        "stormline.router.route": "stormline-router",
        "stormline.worker.assignment": "stormline-worker",
        "chat": "stormline-worker",
        "stormline.worker.trajectory": "stormline-worker",
        "stormline.evaluator.score": "stormline-evaluator",
        "stormline.evaluator.reward": "stormline-evaluator",
    }
    for t in tasks:
        chain = check_chain(t.task_id, by_task[t.task_id])
        assert {sp.step: sp.service for sp in chain} == services
    assert len({next(iter(by_task[t.task_id])) for t in tasks}) == len(tasks)
    print(f"{len(receiver.spans)} spans in {receiver.requests} OTLP requests")  # reported
