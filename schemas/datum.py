"""One Avro datum in and out through fastavro's compiled functions, its schema parsed once.

fastavro's ``schemaless_writer`` and ``schemaless_reader`` parse the schema on every call (a
quick check where it is parsed already, then its named types copied into a fresh dict) and
build an options dict: ~0.4 µs of a 5 µs record. The compiled ``write_data`` and ``_read_data``
they end in take both ready-made. Those are functions of fastavro's Cython build, not its
documented API: they are used only where a probe record with every kind of field this
package's schemas have comes out as the public functions write and read it. Elsewhere
:data:`write_datum` and :data:`read_datum` are the public functions behind the same call.
"""

from __future__ import annotations

import importlib
import io
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import fastavro

_log = logging.getLogger("stormline.serde")

# fastavro's defaults for every option (its public functions build these on every call).
OPTIONS: dict[str, Any] = {}


def named_types(schema: Any) -> dict[str, Any]:
    """A parsed schema's named types, as the compiled functions take them."""
    named: dict[str, Any] = {}
    fastavro.parse_schema(schema, named)
    return named


def read_named(schema: Any) -> dict[str, Any]:
    """``named`` for :data:`read_datum` of ``schema`` (parsed), read as written."""
    return {"writer": named_types(schema), "reader": {}}


def public_write(
    buf: bytearray, record: Any, schema: Any, named: Any, name: str, options: Any
) -> None:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schema, record)
    buf += out.getvalue()


def public_read(buf: Any, schema: Any, named: Any, reader: Any, options: Any) -> Any:
    return fastavro.schemaless_reader(buf, schema, reader)


_PROBE_SCHEMA = {
    "type": "record",
    "name": "Probe",
    "fields": [
        {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "n", "type": "int"},
        {"name": "big", "type": "long"},
        {"name": "x", "type": "double"},
        {"name": "ok", "type": "boolean"},
        {"name": "raw", "type": ["null", "bytes"]},
        {"name": "none", "type": ["null", "string"]},
        {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["a", "b"]}},
        {"name": "e2", "type": "E"},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "ints", "type": ["null", {"type": "array", "items": "int"}]},
        {"name": "m", "type": {"type": "map", "values": "double"}},
        {"name": "mm", "type": {"type": "map", "values": {"type": "array", "items": "string"}}},
        {
            "name": "sub",
            "type": {"type": "record", "name": "Sub", "fields": [{"name": "s", "type": "string"}]},
        },
        {"name": "subs", "type": {"type": "array", "items": "Sub"}},
    ],
}
_PROBE_RECORD = {
    "id": uuid.UUID(int=7),
    "at": datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=UTC),
    "n": -3,
    "big": 1 << 40,
    "x": 0.5,
    "ok": True,
    "raw": b"\x00",
    "none": None,
    "e": "b",
    "e2": "a",
    "tags": ["t", ""],
    "ints": [1, -1],
    "m": {"k": 1.5},
    "mm": {"k": ["v"]},
    "sub": {"s": "é"},
    "subs": [{"s": "x"}, {"s": "y"}],
}


def _compiled() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    try:
        read = importlib.import_module("fastavro._read")._read_data
        write = importlib.import_module("fastavro._write").write_data
        schema = fastavro.parse_schema(_PROBE_SCHEMA)
        public = io.BytesIO()
        fastavro.schemaless_writer(public, schema, _PROBE_RECORD)
        mine = bytearray()
        write(mine, _PROBE_RECORD, schema, named_types(schema), "", OPTIONS)
        back = read(io.BytesIO(public.getvalue()), schema, read_named(schema), None, OPTIONS)
        expected = fastavro.schemaless_reader(io.BytesIO(public.getvalue()), schema, None)
        if bytes(mine) == public.getvalue() and back == expected:
            return read, write
        _log.info("fastavro's compiled per-datum functions differ from its public ones")
    except Exception as exc:  # another fastavro: its public functions are the safe ones
        _log.info("fastavro's compiled per-datum functions unused: %r", exc)
    return None


COMPILED = _compiled()
# write_datum(buf: bytearray, record, schema, named_types(schema), "", OPTIONS) appends the
# datum to buf; read_datum(file, schema, read_named(schema), None, OPTIONS) reads one.
write_datum: Callable[..., Any] = COMPILED[1] if COMPILED else public_write
read_datum: Callable[..., Any] = COMPILED[0] if COMPILED else public_read
