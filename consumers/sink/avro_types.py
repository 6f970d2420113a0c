"""Avro types to Arrow and ClickHouse types (pure, no I/O).

Type mapping (Avro -> Arrow / ClickHouse):

* string, uuid -> string / String; bytes -> binary / String; int -> int32 / Int32;
  long -> int64 / Int64; float, double -> float32, float64 / Float32, Float64;
  boolean -> bool / Bool; timestamp-millis -> timestamp[ms, UTC] / DateTime64(3, 'UTC');
  enum -> string / String (its symbol); array -> list / Array; map -> map / Map(String, _).
* union with null (optional) -> a nullable field / Nullable(_). The sink's storage rule
  (:func:`stored`): optional strings, bytes, ints, arrays and maps store their zero value
  ('' / 0 / [] / {}) instead of NULL, so those columns are never Nullable and ``x != ''``
  means "set" on chDB and on a server alike; optional floats stay Nullable, since 0.0 is a
  measurement, not "unset".
* records have no column type: a table declares how it keeps them (:class:`Flatten`,
  :class:`Json`, an exploded table). Queue tables (:func:`queue_type`) map them to named
  Tuples, as ClickHouse's AvroConfluent format reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa

AvroType = Any  # an expanded Avro schema node: a name, a dict or a union list

_PRIMS: dict[str, tuple[pa.DataType, str]] = {
    "string": (pa.string(), "String"),
    "bytes": (pa.binary(), "String"),
    "int": (pa.int32(), "Int32"),
    "long": (pa.int64(), "Int64"),
    "float": (pa.float32(), "Float32"),
    "double": (pa.float64(), "Float64"),
    "boolean": (pa.bool_(), "Bool"),
}
ZERO: dict[str, Any] = {"string": "", "bytes": b"", "int": 0, "long": 0, "array": [], "map": {}}
SQL_ZERO = {"string": "''", "bytes": "''", "int": "0", "long": "0", "array": "[]", "map": "map()"}
TS = pa.timestamp("ms", tz="UTC")
CH_TS = "DateTime64(3, 'UTC')"


# -------------------------------------------------------------------------- types --
def kind(t: AvroType) -> str:
    """string, uuid, timestamp-millis, int, ..., enum, array, map, record or union."""
    if isinstance(t, list):
        return "union"
    if isinstance(t, dict):
        return str(t.get("logicalType") or t["type"])
    return str(t)


def optional(t: AvroType) -> AvroType | None:
    """T for a union of null and T, else None."""
    if isinstance(t, list) and len(t) == 2 and "null" in t:
        return t[1] if t[0] == "null" else t[0]
    return None


def base_kind(t: AvroType) -> str:
    """kind(), with uuid as the string it is."""
    return "string" if kind(t) == "uuid" else kind(t)


def stored(t: AvroType) -> AvroType:
    """The type the sink stores for ``t``: optional non-floats become their zero value."""
    inner = optional(t)
    if inner is not None and base_kind(inner) in ZERO:
        return inner
    return t


def arrow_type(t: AvroType) -> tuple[pa.DataType, bool]:
    """(Arrow type, nullable) of a stored Avro type."""
    inner = optional(t)
    if inner is not None:
        return arrow_type(inner)[0], True
    k = kind(t)
    if k in ("uuid", "enum"):
        return pa.string(), False
    if k == "timestamp-millis":
        return TS, False
    if k == "array":
        return pa.list_(pa.field("item", arrow_type(t["items"])[0], nullable=False)), False
    if k == "map":
        value = pa.field("value", arrow_type(t["values"])[0], nullable=False)
        return pa.map_(pa.string(), value), False
    if k in _PRIMS:
        return _PRIMS[k][0], False
    raise TypeError(f"no column type for Avro {k}: declare how the table keeps it")


def clickhouse_type(t: AvroType) -> str:
    """The ClickHouse type of a stored Avro type (what chDB infers from its Arrow type)."""
    inner = optional(t)
    if inner is not None:
        return f"Nullable({clickhouse_type(inner)})"
    k = kind(t)
    if k in ("uuid", "enum"):
        return "String"
    if k == "timestamp-millis":
        return CH_TS
    if k == "array":
        return f"Array({clickhouse_type(t['items'])})"
    if k == "map":
        return f"Map(String, {clickhouse_type(t['values'])})"
    if k in _PRIMS:
        return _PRIMS[k][1]
    raise TypeError(f"no column type for Avro {k}: declare how the table keeps it")


def queue_type(t: AvroType) -> str:
    """The ClickHouse type that reads ``t`` as Avro (AvroConfluent), for Kafka-engine tables."""
    inner = optional(t)
    if inner is not None:
        # Arrays, maps and tuples cannot be Nullable in ClickHouse: null reads as empty.
        wrapped = kind(inner) not in ("array", "map", "record")
        return f"Nullable({queue_type(inner)})" if wrapped else queue_type(inner)
    k = kind(t)
    if k == "uuid":
        return "UUID"
    if k == "record":
        inner = ", ".join(f"{f['name']} {queue_type(f['type'])}" for f in t["fields"])
        return f"Tuple({inner})"
    if k == "array":
        return f"Array({queue_type(t['items'])})"
    if k == "map":
        return f"Map(String, {queue_type(t['values'])})"
    return clickhouse_type(t)


def converter(t: AvroType) -> Callable[[Any], Any] | None:
    """Model value -> the Arrow-ready value of stored type ``t`` (None: as it is)."""
    inner = optional(t)
    if inner is not None:
        conv = converter(inner)
        return None if conv is None else (lambda v: None if v is None else conv(v))
    k = kind(t)
    if k in ("uuid", "enum"):
        return str
    if k == "array":
        item = converter(t["items"])
        return None if item is None else (lambda v: [item(x) for x in v])
    return None
