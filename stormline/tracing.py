"""OpenTelemetry traces across the log: W3C trace context in Kafka headers, spans, the exporter.

One trace per task (the HTTP request's, for tasks submitted through the API), its spans in
order::

    stormline.publish (producer, the root)          publish CLI / API request
    └ stormline.router.route (consumer)             the router assigns the task
      └ stormline.worker.assignment (consumer)      a worker takes the assignment
        ├ chat <model> (client, GenAI conventions)  each try of the LLM call
        └ stormline.worker.trajectory (producer)    the Trajectory goes out
          ├ stormline.evaluator.score (consumer)    the evaluator scores it
          └ stormline.evaluator.reward (producer)   the Reward goes out

Every event produced inside a span carries that span's context in its Kafka headers
(``traceparent``, ``tracestate``; :func:`inject`, which ``EventProducer`` and the router call),
and the receiving side continues from them (:func:`continued`).

Off by default (``STORMLINE_OTEL_EXPORTER=none``): then every helper returns a shared
no-op context manager or ``None`` before touching OpenTelemetry, so a disabled tracer costs
one global read per call. :func:`setup` turns it on for a process (idempotent), with an
OTLP/HTTP exporter (``otlp``) or one JSON line per span on stderr (``console``); the SDK's
own variables (``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_SCHEDULE_DELAY``,
``OTEL_RESOURCE_ATTRIBUTES``, ...) still apply. This module keeps its own tracer provider
(not the global one), so a test can set it up again with an in-memory exporter.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from stormline.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "HEADERS",
    "SpanKind",
    "child",
    "continued",
    "enabled",
    "extract",
    "inject",
    "llm_call",
    "llm_usage",
    "root",
    "setup",
    "shutdown",
]

HEADERS = ("traceparent", "tracestate")
_PROPAGATOR = TraceContextTextMapPropagator()
_NOOP: contextlib.nullcontext[None] = contextlib.nullcontext()  # stateless: shared by all
_lock = threading.Lock()
_tracer: trace.Tracer | None = None
_provider: TracerProvider | None = None

Headers = Iterable[tuple[str, bytes | str | None]] | Mapping[str, bytes | str | None] | None
Attributes = Mapping[str, str | int | float | bool] | None


# ============================================================================ setup ==
def setup(
    settings: Settings | None = None,
    service: str = "stormline",
    *,
    exporter: SpanExporter | None = None,
    batch: bool = True,
) -> bool:
    """Turn tracing on for this process as ``settings`` say; True when it is on.

    ``service`` names the process (``stormline-<service>`` unless STORMLINE_OTEL_SERVICE_NAME
    or OTEL_SERVICE_NAME say otherwise). ``exporter`` (tests: the SDK's in-memory one) replaces
    the configured one and ``batch=False`` exports each span as it ends; given one, setup runs
    again even if tracing was already on.
    """
    global _tracer, _provider
    s = settings or Settings()
    if exporter is None and s.otel_exporter == "none":
        return _tracer is not None
    with _lock:
        if _tracer is not None and exporter is None:
            return True
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        name = s.otel_service_name or os.environ.get("OTEL_SERVICE_NAME") or f"stormline-{service}"
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
        out = exporter or _exporter(s)
        provider.add_span_processor(BatchSpanProcessor(out) if batch else SimpleSpanProcessor(out))
        if _provider is not None:
            _provider.shutdown()
        _provider = provider
        _tracer = provider.get_tracer("stormline")
    return True


def _exporter(s: Settings) -> SpanExporter:
    if s.otel_exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # One JSON line per span on stderr, beside the JSON log lines.
        return ConsoleSpanExporter(
            out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n"
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    endpoint = s.otel_endpoint
    if endpoint and not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    # endpoint None: the exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT itself.
    return OTLPSpanExporter(endpoint=endpoint)


def enabled() -> bool:
    return _tracer is not None


def shutdown() -> None:
    """Export what is pending and turn tracing off (the SDK also flushes at exit)."""
    global _tracer, _provider
    with _lock:
        if _provider is not None:
            _provider.shutdown()
        _tracer = _provider = None


def force_flush(timeout_ms: int = 10_000) -> bool:
    return _provider.force_flush(timeout_ms) if _provider is not None else True


# ================================================================= Kafka headers ==
def inject(headers: list[tuple[str, bytes]] | None = None) -> list[tuple[str, bytes]] | None:
    """``headers`` plus the current span's W3C trace context; unchanged when there is none.

    An existing ``traceparent``/``tracestate`` is replaced: a record carries its own
    producer's context, not the one it was made from.
    """
    if _tracer is None or not trace.get_current_span().get_span_context().is_valid:
        return headers
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    kept = [(k, v) for k, v in (headers or ()) if k not in HEADERS]
    return kept + [(k, v.encode()) for k, v in carrier.items()]


def extract(headers: Headers) -> otel_context.Context | None:
    """The trace context in Kafka ``headers`` (confluent-kafka's list of pairs, aiokafka's
    tuples or Faust's mapping), or None when they carry none."""
    if not headers:
        return None
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    carrier: dict[str, str] = {}
    for k, v in pairs:
        if k in HEADERS and v is not None:
            carrier[k] = v.decode("latin-1") if isinstance(v, bytes) else str(v)
    if "traceparent" not in carrier:
        return None
    ctx = _PROPAGATOR.extract(carrier)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


# ========================================================================== spans ==
def root(name: str, attributes: Attributes = None, kind: SpanKind = SpanKind.PRODUCER) -> Any:
    """A new trace (a context manager yielding the span, or None when tracing is off)."""
    if _tracer is None:
        return _NOOP
    return _tracer.start_as_current_span(
        name, context=otel_context.Context(), kind=kind, attributes=attributes
    )


def continued(
    name: str, headers: Headers, attributes: Attributes = None, kind: SpanKind = SpanKind.CONSUMER
) -> Any:
    """A span continuing the trace in a record's ``headers`` (a new trace if they carry
    none); a context manager yielding the span, or None when tracing is off."""
    if _tracer is None:
        return _NOOP
    ctx = extract(headers) or otel_context.Context()
    return _tracer.start_as_current_span(name, context=ctx, kind=kind, attributes=attributes)


def child(name: str, attributes: Attributes = None, kind: SpanKind = SpanKind.INTERNAL) -> Any:
    """A span under the current one (a context manager; None when tracing is off)."""
    if _tracer is None:
        return _NOOP
    return _tracer.start_as_current_span(name, kind=kind, attributes=attributes)


def llm_call(system: str, model: str, operation: str = "chat") -> Any:
    """A client span of one LLM call, named and attributed as the OpenTelemetry GenAI
    semantic conventions say (``chat <model>``, ``gen_ai.system``, ``gen_ai.request.model``,
    ``gen_ai.operation.name``); :func:`llm_usage` adds the tokens. ``system`` may be a
    provider endpoint key (``openai@http://...``): the part before ``@`` is the system."""
    if _tracer is None:
        return _NOOP
    return _tracer.start_as_current_span(
        f"{operation} {model}",
        kind=SpanKind.CLIENT,
        attributes={
            "gen_ai.system": system.partition("@")[0],
            "gen_ai.request.model": model,
            "gen_ai.operation.name": operation,
        },
    )


def llm_usage(
    span: Span | None,
    input_tokens: int,
    output_tokens: int,
    response_model: str | None = None,
) -> None:
    """The answer's token usage (and model) on an :func:`llm_call` span; None: nothing."""
    if span is None:
        return
    span.set_attribute("gen_ai.usage.input_tokens", int(input_tokens))
    span.set_attribute("gen_ai.usage.output_tokens", int(output_tokens))
    if response_model:
        span.set_attribute("gen_ai.response.model", response_model)
