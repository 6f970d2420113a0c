"""Pydantic models and Avro records: the type walk both directions share, and encode's half.

The serde's hot path (issue 16) keeps pydantic out of the loop. Encode: :func:`dumper` gives
the dict fastavro writes, which is the instance's own ``__dict__`` with nested models replaced
by theirs, where ``model_dump`` builds the same dict through pydantic's serializer for 1-4 µs
per event. Decode (``construct``) builds models from what fastavro reads, which :func:`lean`
makes cheaper to read.

What the generated code cannot stand in for (a serializer, a before- or wrap-validator, an
alias, a type not listed in :func:`shape_of`) raises :class:`Unfit` while it is generated, and
that model keeps pydantic.
"""

from __future__ import annotations

import copy
import types
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from operator import attrgetter
from typing import Annotated, Any, Union, cast, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

Dumper = Callable[[Any], dict[str, Any]]

# The leaf types the generated code handles (construct checks each against its Avro type).
_SCALARS = (str, int, float, bool, bytes, uuid.UUID, datetime)


class Rejected(ValueError):
    """A decoded value breaks one of its model's limits: ``model_validate`` says which."""


class Unfit(TypeError):
    """The model has something the generated code does not reproduce; pydantic keeps it."""


@dataclass(frozen=True)
class Shape:
    kind: str  # scalar, enum, model, list, dict
    tp: Any
    meta: tuple[Any, ...]
    optional: bool
    item: Shape | None = None


def shape_of(annotation: Any, meta: Iterable[Any] = ()) -> Shape:
    found, optional, tp = list(meta), False, annotation
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp, *extra = get_args(tp)
            for m in extra:
                found += m.metadata if isinstance(m, FieldInfo) else [m]
        elif origin in (Union, types.UnionType):
            args = get_args(tp)
            rest = [a for a in args if a is not type(None)]
            if len(args) != 2 or len(rest) != 1 or optional:
                raise Unfit(f"union {tp}")
            optional, tp = True, rest[0]
        else:
            break
    if any(not isinstance(m, at.BaseMetadata) for m in found):
        raise Unfit(f"metadata {found}")  # e.g. a serializer or validator in Annotated
    if origin is list:
        return Shape("list", tp, tuple(found), optional, shape_of(get_args(tp)[0]))
    if origin is dict:
        key, value = get_args(tp)
        if key is not str:
            raise Unfit(f"dict key {key}")
        return Shape("dict", tp, tuple(found), optional, shape_of(value))
    if isinstance(tp, type) and issubclass(tp, Enum):
        return Shape("enum", tp, tuple(found), optional)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return Shape("model", tp, tuple(found), optional)
    if tp in _SCALARS:
        return Shape("scalar", tp, tuple(found), optional)
    raise Unfit(f"type {tp}")


def fields_of(cls: type[BaseModel]) -> dict[str, FieldInfo]:
    for key, value in cls.model_config.items():
        harmless = key in ("frozen", "title") or (
            (key == "extra" and value != "allow") or (key == "use_enum_values" and not value)
        )
        if not harmless:
            raise Unfit(f"{cls.__name__}.model_config[{key!r}]")
    if cls.__private_attributes__ or cls.__pydantic_post_init__ or cls.__pydantic_root_model__:
        raise Unfit(f"{cls.__name__}: private attributes, model_post_init or a root model")
    for name, info in cls.model_fields.items():
        if info.alias or info.validation_alias or info.serialization_alias or info.exclude:
            raise Unfit(f"{cls.__name__}.{name}: alias or exclude")
    return cls.model_fields


class Source:
    """Lines of one generated function and the objects its code names."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.names: dict[str, Any] = {"REJECTED": Rejected}

    def ref(self, obj: Any, stem: str) -> str:
        name = f"{stem}{len(self.names)}"
        self.names[name] = obj
        return name

    def const(self, value: Any) -> str:
        # Literals load faster than globals; any other value goes by name.
        if type(value) in (int, float) and repr(value) == repr(type(value)(repr(value))):
            return repr(value)
        return self.ref(value, "C")

    def function(self, name: str, of: type) -> Callable[..., Any]:
        code = "\n".join(self.lines)
        # The file name tracebacks and profiles show for this code.
        exec(compile(code, f"<generated {name} of {of.__name__}>", "exec"), self.names)
        fn = cast(Callable[..., Any], self.names[name])
        fn.__doc__ = code  # what it does, for whoever debugs it
        return fn


# ------------------------------------------------------------------------ encode --
class Unwritable(ValueError):
    """A value only fastavro's own logical-type writer takes (a naive datetime, which it reads
    as local time): write ``model_dump()`` with the full schema instead."""


def dumper(cls: type[BaseModel], record_schema: dict[str, Any]) -> Dumper | None:
    """``cls`` instance -> the record fastavro writes with the :func:`lean` copy of
    ``record_schema`` (parsed), into the same bytes as ``model_dump()`` with ``record_schema``
    itself; None where it cannot. Raises :class:`Unwritable`, or AttributeError where a nested
    model was swapped for a dict after it was made."""
    try:
        return _dumper(cls, record_schema, record_schema.get("__named_schemas", {}))
    except Unfit:
        return None


def _dumper(cls: type[BaseModel], schema: Any, named: dict[str, Any]) -> Dumper:
    """Straight-line code, generated once per class: a closure per field would cost a call
    per field."""
    d = cls.__pydantic_decorators__
    if d.field_serializers or d.model_serializers or d.computed_fields:
        raise Unfit(f"{cls.__name__}: serializers")
    schema = resolve(schema, named)
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise Unfit(f"{cls.__name__}: not a record in Avro")
    avro = {f["name"]: f["type"] for f in schema["fields"]}
    if set(avro) != set(fields_of(cls)):
        raise Unfit(f"{cls.__name__}: fields differ from {schema.get('name')}")
    src, falsy_ok = Source(), True
    parts: dict[str, str] = {}  # field -> the expression of its value in the record
    src.lines += ["def dump(o):", "    d = o.__dict__"]
    for name, info in fields_of(cls).items():
        shape = shape_of(info.annotation, info.metadata)
        if logical_type(resolve(avro[name], named)) is not None:
            parts[name] = _logical_lines(name, avro[name], named, src, f"a{len(parts)}")
            falsy_ok = False
            continue
        expr = _dump_expr(shape, f"d[{name!r}]", avro[name], named, src, 0)
        if expr is not None:
            parts[name] = expr
            falsy_ok = falsy_ok and (shape.kind != "model" or shape.optional)
    if not parts:
        return attrgetter("__dict__")
    if falsy_ok:
        # Empty lists and dicts and None are written as they are: no copy of the dict then.
        src.lines.append(f"    if not ({' or '.join(f'd[{k!r}]' for k in parts)}):")
        src.lines.append("        return d")
    items = ", ".join(f"{k!r}: {e}" for k, e in parts.items())
    src.lines.append(f"    return {{**d, {items}}}")
    return cast(Dumper, src.function("dump", cls))


def _logical_lines(name: str, avro_type: Any, named: dict[str, Any], src: Source, var: str) -> str:
    """Lines that leave in ``var`` what fastavro's logical-type writer would make of the
    field's value: the same call, or for an aware datetime the same number as its
    ``(delta.days * 86400 + delta.seconds) * 1000 + int(delta.microseconds / 1000)``, which is
    the floor of the delta in milliseconds (tests/test_serde_fast.py compares the bytes over
    thousands of datetimes); any other value goes as it is, as fastavro lets it."""
    src.names |= {"UUID": uuid.UUID, "DATETIME": datetime, "EPOCH": EPOCH}
    src.names["MILLISECOND"] = MILLISECOND
    src.names["UNWRITABLE"] = Unwritable
    src.lines.append(f"    {var} = d[{name!r}]")
    if logical_type(resolve(avro_type, named)) is uuid.UUID:
        src.lines.append(f"    if isinstance({var}, UUID): {var} = str({var})")
    else:
        src.lines += [
            f"    if isinstance({var}, DATETIME):",
            f"        if {var}.tzinfo is None: raise UNWRITABLE({name!r})",
            f"        {var} = ({var} - EPOCH) // MILLISECOND",
        ]
    return var


def _dump_expr(
    shape: Shape, var: str, avro_type: Any, named: dict[str, Any], src: Source, depth: int
) -> str | None:
    t = resolve(avro_type, named)
    if shape.kind == "model":
        inner = _dumper(shape.tp, t, named)
        expr = (
            f"{var}.__dict__" if isinstance(inner, attrgetter) else f"{src.ref(inner, 'D')}({var})"
        )
    elif shape.kind in ("list", "dict") and isinstance(t, dict):
        assert shape.item is not None
        x = f"x{depth}"
        inner_type = t.get("items" if shape.kind == "list" else "values")
        item = _dump_expr(shape.item, x, inner_type, named, src, depth + 1)
        if item is None:
            return None
        made = (
            f"[{item} for {x} in {var}]"
            if shape.kind == "list"
            else f"{{k{depth}: {item} for k{depth}, {x} in {var}.items()}}"
        )
        expr = f"({var} and {made})"  # an empty one is written as it is
    else:
        return None
    return f"(None if {var} is None else {expr})" if shape.optional else expr


def resolve(avro_type: Any, named: dict[str, Any]) -> Any:
    if isinstance(avro_type, str) and avro_type in named:
        return named[avro_type]
    if is_optional(avro_type):
        return resolve(next(t for t in avro_type if t != "null"), named)
    return avro_type


def is_optional(avro_type: Any) -> bool:
    return isinstance(avro_type, list) and len(avro_type) == 2 and "null" in avro_type


# ------------------------------------------------------------------ logical types --
# fastavro reads these through a generic logical-type hook, then uuid.UUID's string parsing
# or a datetime sum: ~1.4 and ~1.1 µs of a 5 µs AgentHealthChanged (writing them, ~0.9 µs
# each). The generated code makes the same values for ~0.3 µs each, from and to the plain
# string and long of the :func:`lean` schema. Only a record's fields, or their optional
# branch, are read and written plain.
_PLAIN: dict[tuple[Any, Any], type] = {
    ("string", "uuid"): uuid.UUID,
    ("long", "timestamp-millis"): datetime,
}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # fastavro's, for the same datetimes
MILLISECOND = timedelta(milliseconds=1)


def lean(schema: Any) -> Any:
    """A copy of ``schema`` (JSON, unparsed) whose record fields of the logical types above are
    plain: the schema the builder's records are read with and the dumper's written with."""
    schema = copy.deepcopy(schema)
    _strip(schema)
    return schema


def _strip(t: Any) -> None:
    if isinstance(t, list):
        for branch in t:
            _strip(branch)
    elif isinstance(t, dict):
        kind = t.get("type")
        if kind == "record":
            for f in t["fields"]:
                if logical_type(f["type"]):
                    f["type"] = f["type"]["type"]
                elif is_optional(f["type"]):
                    f["type"] = [b["type"] if logical_type(b) else b for b in f["type"]]
                _strip(f["type"])
        elif kind == "array":
            _strip(t["items"])
        elif kind == "map":
            _strip(t["values"])
        elif isinstance(kind, dict | list):
            _strip(kind)


def logical_type(avro_type: Any) -> Any:
    """The Python type a plain-read logical type converts to, or None."""
    if isinstance(avro_type, dict):
        return _PLAIN.get((avro_type.get("type"), avro_type.get("logicalType")))
    return None
