"""The one serde: pydantic events <-> Avro bytes in the Confluent wire format.

Wire format: magic byte 0, a 4-byte big-endian schema id, then the Avro body written
schemaless by fastavro. Ids come from a Confluent-compatible schema registry (subject
``<topic>-value``), so Kafka UI, kcat and any Confluent client can decode the events.
Decoding resolves the writer's schema by id and reads it with this process's schema, so
old and new producers coexist.

With ``STORMLINE_SCHEMA_REGISTRY_URL=none`` there is no registry: the id is the first 31
bits of the SHA-256 of the schema's canonical form, which every process computes the same
way from the schemas in this package (current and released).

No secret leaves in an event: :meth:`Serde.encode` looks for every secret this process
knows (:func:`stormline.logs.secret_needles`) in the encoded bytes, where any text field's
value lies whole, and re-encodes with them masked when one is there (rare, so the common
path pays one substring search per secret). Registry errors never show a URL's password.

The hot path (issue 16) keeps pydantic out of the loop, and fastavro's work to what only it
does. Encode writes the instance's own field values (:func:`convert.dumper`), decode builds
the model from the record fastavro read, checking only what the schema cannot state: the
models' limits and validators (:func:`construct.builder`). Both use a :func:`lean_schema`
whose uuid and timestamp-millis fields are plain string and long, converted by the generated
code (fastavro's generic logical-type hook costs more than the conversion), and fastavro's
compiled per-datum functions with the schema parsed once (:mod:`datum`). The bytes are those
``model_dump()`` and fastavro gave before; where the fast decode says no (a broken limit, an
odd value), the validating path runs as it always did and its error is the one raised. A
record whose writer schema differs from this process's is resolved by fastavro and validated
by pydantic in full.

Validation on the way in stays where the input is untrusted: ``stormline publish`` and the
HTTP API validate what they are given as pydantic models before anything is encoded, and
decode still rejects whatever breaks a model's limits (a ``validation`` dead letter).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import struct
import threading
from functools import cache
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import fastavro
from fastavro.schema import to_parsing_canonical_form
from pydantic import ValidationError

from stormline import logs
from stormline.schemas import construct, convert, datum
from stormline.schemas.models import AVRO_SHAPED_VALIDATORS, EVENT_TYPES, Event
from stormline.settings import Settings

_log = logging.getLogger("stormline.serde")
AVRO_DIR = Path(__file__).parent / "avro"
RELEASED_DIR = Path(__file__).parent / "released"
MAGIC = 0
_HEADER = struct.Struct(">bI")
_UNPACK = _HEADER.unpack_from

E = TypeVar("E", bound=Event)


class DecodeError(ValueError):
    """A record that cannot become an event. ``kind`` is what dead letters are grouped by."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class RegistryUnavailable(RuntimeError):
    pass


# ----------------------------------------------------------------------- schemas --
def schema_file(event_type: type[Event]) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", event_type.__name__).lower() + ".avsc"


@cache
def schema_str(event_type: type[Event]) -> str:
    return (AVRO_DIR / schema_file(event_type)).read_text()


@cache
def parsed_schema(event_type: type[Event]) -> Any:
    return fastavro.parse_schema(json.loads(schema_str(event_type)))


@cache
def lean_schema(event_type: type[Event]) -> Any:
    """``event_type``'s schema, parsed, with its uuid and timestamp-millis fields read as plain
    string and long (:func:`convert.lean`): what the fast decode reads, the builder converts."""
    return fastavro.parse_schema(convert.lean(json.loads(schema_str(event_type))))


@cache
def _write_plan(event_type: type[Event]) -> tuple[Any, dict[str, Any], Any]:
    """(schema, its named types, the record of an instance in it): the lean schema and the
    dumper where there is one, else the full schema and ``model_dump``."""
    dump = convert.dumper(event_type, parsed_schema(event_type))
    schema = lean_schema(event_type) if dump else parsed_schema(event_type)
    return schema, datum.named_types(schema), dump or _model_dump


def _model_dump(event: Event) -> dict[str, Any]:
    return event.model_dump()


@cache
def _named_full(event_type: type[Event]) -> dict[str, Any]:
    return datum.named_types(parsed_schema(event_type))


@cache
def _read_plan(event_type: type[Event]) -> tuple[Any, Any, Any, Any] | None:
    """(read, lean schema, its named types, builder) where a builder can stand in for
    ``model_validate``: ``builder(read(buf, lean, named, None, options))`` is the event."""
    build = construct.builder(event_type, parsed_schema(event_type), AVRO_SHAPED_VALIDATORS)
    if build is None:
        return None
    lean = lean_schema(event_type)
    return datum.read_datum, lean, datum.read_named(lean), build


_BytesIO = io.BytesIO
_OPTIONS = datum.OPTIONS


def fingerprint_id(schema_json: str) -> int:
    canonical = to_parsing_canonical_form(json.loads(schema_json))
    return int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:4], "big") & 0x7FFFFFFF


# ---------------------------------------------------------------------- registries --
class SchemaRegistry(Protocol):
    def id_for(self, subject: str, schema_json: str) -> int: ...
    def schema_for(self, schema_id: int) -> str | None: ...


class ConfluentRegistry:
    """Any Confluent-compatible registry, through confluent-kafka's SchemaRegistryClient."""

    def __init__(self, url: str) -> None:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self.url = url
        # new_client() gives the in-memory mock for mock:// URLs (unit tests only).
        self._client = SchemaRegistryClient.new_client({"url": url, "timeout": 10})

    def id_for(self, subject: str, schema_json: str) -> int:
        from confluent_kafka.schema_registry import Schema

        try:
            return int(self._client.register_schema(subject, Schema(schema_json, "AVRO")))
        except Exception as exc:
            raise _unavailable(self.url, exc) from exc

    def schema_for(self, schema_id: int) -> str | None:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            return str(self._client.get_schema(schema_id).schema_str)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404:
                return None
            raise _unavailable(self.url, exc) from exc
        except Exception as exc:
            raise _unavailable(self.url, exc) from exc


def _unavailable(url: str, exc: Exception) -> RegistryUnavailable:
    # The URL may carry credentials, and so may the client's error text: neither may reach
    # a log line or a dead letter.
    return RegistryUnavailable(
        f"The schema registry at {logs.redact_url(url)} did not answer "
        f"({type(exc).__name__}: {logs.redact(str(exc))}). Run "
        "`stormline up` for the embedded one, or set STORMLINE_SCHEMA_REGISTRY_URL to a "
        "Confluent-compatible registry (or to 'none' to use schema fingerprints as ids)."
    )


class FingerprintRegistry:
    """No registry: ids are schema fingerprints, known schemas are this package's files."""

    def __init__(self) -> None:
        self._by_id: dict[int, str] = {}
        for path in [*AVRO_DIR.glob("*.avsc"), *RELEASED_DIR.glob("*/*.avsc")]:
            text = path.read_text()
            self._by_id[fingerprint_id(text)] = text

    def id_for(self, subject: str, schema_json: str) -> int:
        sid = fingerprint_id(schema_json)
        self._by_id.setdefault(sid, schema_json)
        return sid

    def schema_for(self, schema_id: int) -> str | None:
        return self._by_id.get(schema_id)


def registry_for(settings: Settings) -> SchemaRegistry:
    url = settings.registry_url
    if url.lower() in {"none", "off"}:
        return FingerprintRegistry()
    return ConfluentRegistry(url)


# ---------------------------------------------------------------------------- serde --
class Serde:
    def __init__(self, registry: SchemaRegistry) -> None:
        self.registry = registry
        self._ids: dict[tuple[str, type[Event]], bytes] = {}
        self._writers: dict[int, Any] = {}
        # (topic, type) -> (header, schema, its named types, dumper)
        self._encoders: dict[tuple[str, type[Event]], tuple[bytes, Any, Any, Any]] = {}
        # (schema id, type) -> the fast decode's plan (_read_plan), () where there is none
        self._fast: dict[tuple[int, type[Event]], tuple[Any, ...]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Serde:
        logs.register_settings(settings)  # their secrets never leave in an event
        return cls(registry_for(settings))

    # -- encode --
    def register(self, topic: str, event_type: type[Event]) -> int:
        """Register ``event_type``'s schema under ``<topic>-value``; return its id."""
        # struct.unpack is typed tuple[Any, ...]; _HEADER's second field is ">I", an int.
        return cast(int, _HEADER.unpack(self._header(topic, event_type))[1])

    def _header(self, topic: str, event_type: type[Event]) -> bytes:
        key = (topic, event_type)
        header = self._ids.get(key)
        if header is None:
            with self._lock:
                sid = self.registry.id_for(f"{topic}-value", schema_str(event_type))
                header = _HEADER.pack(MAGIC, sid)
                self._ids[key] = header
                self._writers[sid] = parsed_schema(event_type)
        return header

    def _encoder(self, topic: str, event_type: type[Event]) -> tuple[bytes, Any, Any, Any]:
        plan = (self._header(topic, event_type), *_write_plan(event_type))
        self._encoders[(topic, event_type)] = plan
        return plan

    def encode(self, topic: str, event: Event) -> bytes:
        plan = self._encoders.get((topic, type(event)))
        header, schema, named, dump = plan or self._encoder(topic, type(event))
        buf = bytearray(header)
        try:
            record = dump(event)
        except (AttributeError, convert.Unwritable):
            # A nested model swapped for a dict after it was made, or a naive datetime:
            # pydantic and fastavro's own logical types make of them what they always did.
            full = parsed_schema(type(event))
            datum.write_datum(buf, event.model_dump(), full, _named_full(type(event)), "", _OPTIONS)
        else:
            datum.write_datum(buf, record, schema, named, "", _OPTIONS)
        data = bytes(buf)
        # Every text field's value lies whole in the body: one substring search per secret.
        for needle in logs.SECRETS.needles:
            if needle in data:
                return self._encode_redacted(topic, event)
        return data

    def _encode_redacted(self, topic: str, event: Event) -> bytes:
        """``event`` with every secret in its text (and bytes) fields masked."""
        _log.warning(
            "a secret was in a %s event for %s: masked before it left",
            type(event).__name__,
            topic,
        )
        buf = io.BytesIO()
        buf.write(self._header(topic, type(event)))
        clean = logs.redact_tree(event.model_dump())
        fastavro.schemaless_writer(buf, parsed_schema(type(event)), clean)
        return buf.getvalue()

    # -- decode --
    def decode(self, data: bytes | None, event_type: type[E]) -> E:
        """The event in ``data``; :class:`DecodeError` where it is not one."""
        try:
            magic, sid = _UNPACK(data) if data else (-1, -1)
        except struct.error:  # fewer than 5 bytes
            magic = sid = -1
        if magic != MAGIC or not data:
            raise _framing(data)
        plan = self._fast.get((sid, event_type))
        if plan is None:
            plan = self._fast_plan(sid, event_type)
        if plan:
            read, lean, named, build = plan
            try:
                buf = _BytesIO(data)
                buf.seek(5)
                return build(read(buf, lean, named, None, _OPTIONS))
            except Exception:  # a limit broken, or a record the fast path cannot read:
                pass  # the validating path below says what is wrong, as it always has
        record = self.decode_record(data, event_type)
        try:
            return event_type.model_validate(record)
        except ValidationError as exc:
            raise DecodeError("validation", _short(exc)) from exc

    def _fast_plan(self, sid: int, event_type: type[Event]) -> tuple[Any, ...]:
        """:func:`_read_plan` where ``sid`` is ``event_type``'s own schema, else ()."""
        own = self._writer(sid) is parsed_schema(event_type)
        plan = (_read_plan(event_type) if own else None) or ()
        self._fast[(sid, event_type)] = plan
        return plan

    def decode_record(self, data: bytes | None, event_type: type[Event]) -> dict[str, Any]:
        """Avro bytes to a plain dict in ``event_type``'s (reader) schema, unvalidated."""
        if not data or len(data) < 5 or data[0] != MAGIC:
            raise _framing(data)
        sid = _HEADER.unpack_from(data)[1]
        writer = self._writer(sid)
        reader = parsed_schema(event_type)
        try:
            buf = io.BytesIO(data)
            buf.seek(5)
            # fastavro types the result as any Avro value; every event schema is a record,
            # which fastavro reads as a dict.
            if writer is reader:
                return cast(dict[str, Any], fastavro.schemaless_reader(buf, writer, None))
            return cast(dict[str, Any], fastavro.schemaless_reader(buf, writer, reader))
        except Exception as exc:
            raise DecodeError("avro", f"schema id {sid}: {type(exc).__name__}: {exc}") from exc

    def _writer(self, sid: int) -> Any:
        writer = self._writers.get(sid)
        if writer is None:
            text = self.registry.schema_for(sid)
            if text is None:
                raise DecodeError("unknown-schema", f"schema id {sid} is not in the registry")
            parsed = json.loads(text)
            known = {t.AVRO_NAME: t for t in EVENT_TYPES}
            current = known.get(f"{parsed.get('namespace', '')}.{parsed.get('name', '')}")
            # The same schema as ours: reuse the parsed reader so decoding skips resolution.
            if current is not None and fingerprint_id(text) == fingerprint_id(schema_str(current)):
                writer = parsed_schema(current)
            else:
                writer = fastavro.parse_schema(parsed)
            self._writers[sid] = writer
        return writer


def _framing(data: bytes | None) -> DecodeError:
    return DecodeError(
        "framing",
        "not in the Confluent wire format (magic byte 0, "
        f"4-byte schema id); got {len(data or b'')} bytes",
    )


def _short(exc: ValidationError) -> str:
    parts = [f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors()[:5]]
    return "; ".join(parts)
