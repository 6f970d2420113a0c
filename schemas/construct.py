"""fastavro's record -> the pydantic model, without validating it again (the serde's decode).

fastavro gives every value the type its schema names, so pydantic's validation of a decoded
record repeats work; the code generated here (once per model class: straight-line code, as a
closure per field would cost a call per field) only does what the schema cannot:

* checks the models' limits (lengths, ranges; a pattern through pydantic-core, field alone)
  and runs their after-validators, except those the schema makes redundant;
* turns enum symbols into members and nested records into models, and, from the plain string
  and long that :func:`convert.lean` has fastavro read, makes UUIDs and datetimes (see
  ``convert``'s logical types);
* puts the fields in the model's order (pydantic's dumps and JSON follow ``__dict__``) and sets
  the instance up as ``model_validate`` does: all fields set, no extra, no private state.

A builder raises (:class:`convert.Rejected` for a broken limit, ValueError or KeyError for a
value it does not take) where it does not build; its caller then takes the validating path,
whose errors are pydantic's and fastavro's own.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Annotated, Any, cast

import annotated_types as at
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from stormline.schemas.convert import (
    EPOCH,
    MILLISECOND,
    Shape,
    Source,
    Unfit,
    fields_of,
    is_optional,
    logical_type,
    resolve,
    shape_of,
)

Builder = Callable[[dict[str, Any]], Any]

# Avro types whose values fastavro reads as the Python type pydantic keeps for the model's
# type: no coercion on either side (a float field over an Avro long would be one).
_AVRO_OF = {
    str: ("string",),
    int: ("int", "long"),
    float: ("double", "float"),
    bool: ("boolean",),
    bytes: ("bytes",),
}


def builder(
    cls: type[BaseModel], record_schema: dict[str, Any], skip_validators: Iterable[str] = ()
) -> Builder | None:
    """A record fastavro read with :func:`convert.lean` of ``record_schema`` (parsed) -> the
    ``cls`` that ``model_validate`` would make of it read with ``record_schema`` itself; None
    where no code here can stand in for it.

    ``skip_validators``: names of field validators whose work the schema already does.
    """
    try:
        named = record_schema.get("__named_schemas", {})
        src = Source()
        body = _record_lines(cls, record_schema, named, frozenset(skip_validators), src, 0)
        src.lines = ["def build(r0):", *_indent(body, 1), "    return o0"]
        return cast(Builder, src.function("build", cls))
    except Unfit:
        return None


def _indent(lines: list[str], levels: int) -> list[str]:
    return [" " * 4 * levels + line for line in lines]


def _record_lines(
    cls: type[BaseModel],
    schema: Any,
    named: dict[str, Any],
    skip: frozenset[str],
    src: Source,
    depth: int,
) -> list[str]:
    """Lines that check record ``r<depth>`` and leave the ``cls`` made of it in ``o<depth>``.

    Nested records are built inline, one level deeper (their own ``r``, ``o``, ``v``...): a
    call per nested record costs ~0.1 µs, a quarter of what setting one up costs.
    """
    schema = resolve(schema, named)
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise Unfit(f"{cls.__name__}: not a record in Avro")
    if cls.__new__ is not object.__new__:
        raise Unfit(f"{cls.__name__}.__new__")
    fields = fields_of(cls)
    avro = {f["name"]: f["type"] for f in schema["fields"]}
    if set(avro) != set(fields):
        raise Unfit(f"{cls.__name__}: fields differ from {schema.get('name')}")
    r, o = f"r{depth}", f"o{depth}"
    lines = []
    for name, info in fields.items():
        shape = shape_of(info.annotation, info.metadata)
        lines += _field_lines(shape, name, info, avro[name], named, skip, src, depth)
    lines += _validator_lines(cls, skip, src, r)
    # fastavro fills the dict in the schema's order; pydantic's is the model's.
    lines += [f"{r}[{n!r}] = {r}.pop({n!r})" for n in _moves(list(avro), list(fields))]
    cls_name = src.ref(cls, "CLS")
    names = src.ref(frozenset(fields), "NAMES")
    src.names |= {
        "NEW": object.__new__,
        "SET_DICT": BaseModel.__dict__["__dict__"].__set__,
        "SET_FIELDS": BaseModel.__dict__["__pydantic_fields_set__"].__set__,
        "SET_EXTRA": BaseModel.__dict__["__pydantic_extra__"].__set__,
        "SET_PRIVATE": BaseModel.__dict__["__pydantic_private__"].__set__,
    }
    # What model_validate leaves on an instance: the fields given (all of them here), no
    # extra, no private state.
    return [
        *lines,
        f"{o} = NEW({cls_name})",
        f"SET_DICT({o}, {r})",
        f"SET_FIELDS({o}, set({names}))",
        f"SET_EXTRA({o}, None)",
        f"SET_PRIVATE({o}, None)",
    ]


def _uuid_lines(target: str, v: str, depth: int, src: Source) -> list[str]:
    """``uuid.UUID(v)`` for ``v`` with nothing but dashes to strip, without its string handling.

    UUID strips "urn:", "uuid:", braces and dashes, wants 32 characters left and parses them
    with int(v, 16): with only dashes stripped, the int is the same, and any other character
    fails here (int() or the length) and goes to the caller's validating path, where fastavro
    calls UUID itself. The instance is set as UUID.__init__ sets it (checked at import).
    """
    src.names |= {"UUID": uuid.UUID, "SAFE_UNKNOWN": uuid.SafeUUID.unknown, "NEW": object.__new__}
    src.names["SET_UUID_INT"] = _SET_UUID_INT
    src.names["SET_UUID_SAFE"] = _SET_UUID_SAFE
    if not _UUID_BY_INT:
        return [f"{target} = UUID({v})"]
    x, u = f"x{depth}", f"u{depth}"
    return [
        f"{x} = {v}.replace('-', '')",
        f"if len({x}) != 32: raise REJECTED",
        f"{u} = NEW(UUID)",
        f"SET_UUID_INT({u}, int({x}, 16))",
        f"SET_UUID_SAFE({u}, SAFE_UNKNOWN)",
        f"{target} = {u}",
    ]


# UUID's own slots, set past its __setattr__ (which refuses: UUIDs are immutable) as its
# __init__ sets them.
_SET_UUID_INT = uuid.UUID.__dict__["int"].__set__
_SET_UUID_SAFE = uuid.UUID.__dict__["is_safe"].__set__


def _uuid_by_int_works() -> bool:
    text = "12345678-9abc-def0-1234-56789ABCDEF0"
    made = object.__new__(uuid.UUID)
    _SET_UUID_INT(made, int(text.replace("-", ""), 16))
    _SET_UUID_SAFE(made, uuid.SafeUUID.unknown)
    want = uuid.UUID(text)
    return made == want and made.__getstate__() == want.__getstate__() and str(made) == str(want)


_UUID_BY_INT = _uuid_by_int_works()


def _conditions(shape: Shape, var: str, src: Source) -> tuple[list[str], list[Any]]:
    """Python conditions, true when ``var`` keeps the limits; limits they do not cover.

    Each is written as "holds" (``0.0 <= v``), so NaN fails every bound as in pydantic.
    """
    bounds: dict[str, Any] = {}
    rest = []
    for m in shape.meta:
        if isinstance(m, at.MinLen | at.MaxLen):
            bounds[type(m).__name__] = m.min_length if isinstance(m, at.MinLen) else m.max_length
        elif isinstance(m, at.Ge | at.Gt | at.Le | at.Lt):
            bounds[type(m).__name__] = getattr(m, type(m).__name__.lower())
        else:
            rest.append(m)
    conds = []
    if bounds.get("MinLen") or "MaxLen" in bounds:
        low = f"{bounds['MinLen']} <= " if bounds.get("MinLen") else ""
        high = f" <= {bounds['MaxLen']}" if "MaxLen" in bounds else ""
        conds.append(f"{low}len({var}){high}")
    low = next(
        (f"{src.const(bounds[k])} {op} " for k, op in (("Ge", "<="), ("Gt", "<")) if k in bounds),
        "",
    )
    high = next(
        (f" {op} {src.const(bounds[k])}" for k, op in (("Le", "<="), ("Lt", "<")) if k in bounds),
        "",
    )
    if ("Ge" in bounds and "Gt" in bounds) or ("Le" in bounds and "Lt" in bounds):
        raise Unfit(f"both bounds of a kind: {shape.meta}")
    if low or high:
        conds.append(f"{low}{var}{high}")
    return conds, rest


def _field_lines(
    shape: Shape,
    name: str,
    info: FieldInfo,
    avro_type: Any,
    named: dict[str, Any],
    skip: frozenset[str],
    src: Source,
    depth: int,
) -> list[str]:
    """Lines checking and converting field ``name`` of record ``r<depth>``."""
    _check_avro(shape, avro_type, named, name)
    v = f"v{depth}"
    target = f"r{depth}[{name!r}]"
    conds, rest = _conditions(shape, v, src)
    t = resolve(avro_type, named)
    plain = logical_type(t)
    if rest and plain is None:
        # A limit this module does not compile (a pattern, say): pydantic-core checks this
        # field alone (a pattern costs ~0.2 µs there, less than Python's re).
        adapter = TypeAdapter(cast(Any, Annotated)[(info.annotation, *info.metadata)])
        return [f"{target} = {src.ref(adapter.validator.validate_python, 'VALIDATE')}({target})"]
    if plain is not None:
        if conds or rest:
            raise Unfit(f"{name}: limits on a {t}")
        if plain is uuid.UUID:
            body = _uuid_lines(target, v, depth, src)
        else:
            # fastavro's epoch + timedelta(microseconds=v * 1000), the same datetime to the
            # microsecond and the same tzinfo; a timedelta times an int skips the slow
            # keyword constructor (0.25 µs against 0.4).
            src.names |= {"EPOCH": EPOCH, "MILLISECOND": MILLISECOND}
            body = [f"{target} = EPOCH + MILLISECOND * {v}"]
    else:
        # Read once and used once: no local for it.
        once = not conds and not shape.optional and shape.kind in ("enum", "model")
        var = target if once else v
        body = [f"if not ({' and '.join(conds)}): raise REJECTED"] if conds else []
        if shape.kind in ("list", "dict"):
            body += _container_lines(shape, t, target, named, skip, src, depth)
        elif shape.kind == "enum":
            body.append(f"{target} = {src.ref(_members(shape.tp), 'MEMBERS')}[{var}]")
        elif shape.kind == "model":
            body += _model_lines(shape.tp, t, var, target, named, skip, src, depth)
        if once:
            return body
    if not body:
        return []
    if shape.optional:
        body = [f"if {v} is not None:", *_indent(body, 1)]
    return [f"{v} = {target}", *body]


def _members(enum: Any) -> dict[Any, Any]:
    return {m.value: m for m in enum}  # a symbol the enum lacks: KeyError


def _model_lines(
    cls: type[BaseModel],
    schema: Any,
    var: str,
    target: str,
    named: dict[str, Any],
    skip: frozenset[str],
    src: Source,
    depth: int,
) -> list[str]:
    inner = depth + 1
    return [
        f"r{inner} = {var}",
        *_record_lines(cls, schema, named, skip, src, inner),
        f"{target} = o{inner}",
    ]


def _container_lines(
    shape: Shape,
    t: Any,
    target: str,
    named: dict[str, Any],
    skip: frozenset[str],
    src: Source,
    depth: int,
) -> list[str]:
    assert shape.item is not None
    item, v, x, made = shape.item, f"v{depth}", f"x{depth}", f"l{depth}"
    if item.kind in ("list", "dict"):
        if _needs_work(item):
            raise Unfit(f"nested container {shape.tp}")
        return []
    conds, rest = _conditions(item, x, src)
    if rest:
        raise Unfit(f"item limits {rest}")
    each = f"for {x} in {v}:" if shape.kind == "list" else f"for {x} in {v}.values():"
    body = [each, f"    if not ({' and '.join(conds)}): raise REJECTED"] if conds else []
    if item.kind == "enum":
        members = src.ref(_members(item.tp), "MEMBERS")
        new = (
            f"[{members}[{x}] for {x} in {v}]"
            if shape.kind == "list"
            else f"{{k: {members}[{x}] for k, {x} in {v}.items()}}"
        )
        body.append(f"if {v}: {target} = {new}")
    elif item.kind == "model":
        inner = depth + 1
        record = resolve(t["items" if shape.kind == "list" else "values"], named)
        build = _record_lines(item.tp, record, named, skip, src, inner)
        if shape.kind == "list":
            loop = [f"{made} = []", f"for r{inner} in {v}:"]
            keep = f"{made}.append(o{inner})"
        else:
            loop = [f"{made} = {{}}", f"for k{depth}, r{inner} in {v}.items():"]
            keep = f"{made}[k{depth}] = o{inner}"
        body += [
            f"if {v}:",
            *_indent([*loop, *_indent([*build, keep], 1), f"{target} = {made}"], 1),
        ]
    return body


def _check_avro(shape: Shape, avro_type: Any, named: dict[str, Any], where: str) -> None:
    """Unfit unless fastavro reads ``avro_type`` as what pydantic keeps for ``shape``."""
    if shape.optional != is_optional(avro_type):
        raise Unfit(f"{where}: optional in one of model and schema only")
    t = resolve(avro_type, named)
    kind = t.get("type") if isinstance(t, dict) else t
    plain = logical_type(t)
    if shape.kind == "scalar":
        fits = (
            plain is shape.tp
            if plain or shape.tp in (uuid.UUID, datetime)
            else (kind in _AVRO_OF[shape.tp] and not (isinstance(t, dict) and "logicalType" in t))
        )
    else:
        fits = (
            kind == {"enum": "enum", "model": "record", "list": "array", "dict": "map"}[shape.kind]
        )
    if not fits:
        raise Unfit(f"{where}: {shape.tp} over Avro {t}")
    if shape.item is not None:
        _check_avro(shape.item, t["items" if shape.kind == "list" else "values"], named, where)


def _needs_work(shape: Shape) -> bool:
    if shape.meta or shape.kind in ("enum", "model"):
        return True
    return shape.item is not None and _needs_work(shape.item)


def _validator_lines(cls: type[BaseModel], skip: frozenset[str], src: Source, r: str) -> list[str]:
    d = cls.__pydantic_decorators__
    if d.model_validators or d.validators or d.root_validators:
        raise Unfit(f"{cls.__name__}: model or v1 validators")
    lines = []
    for name, dec in d.field_validators.items():
        if name in skip:
            continue
        if dec.info.mode != "after" or _takes_info(dec.func):
            raise Unfit(f"{cls.__name__}.{name}: not a plain after-validator")
        fields = cls.model_fields if "*" in dec.info.fields else dec.info.fields
        fn = src.ref(dec.func, "VALIDATOR")
        lines += [f"{r}[{f!r}] = {fn}({r}[{f!r}])" for f in fields if f in cls.model_fields]
    return lines


def _takes_info(func: Any) -> bool:
    """Whether pydantic calls ``func`` with a ValidationInfo too, as pydantic itself decides;
    where that function is gone or changed (a pydantic internal), take it as so: pydantic
    keeps the model."""
    try:
        from pydantic._internal._decorators import inspect_validator

        return bool(inspect_validator(func, mode="after", type="field"))
    except Exception:
        return True


def _moves(have: list[str], want: list[str]) -> list[str]:
    """Keys to pop and put back, in turn, so that a dict ordered ``have`` is ordered ``want``.

    The longest head of ``want`` found in order in ``have`` stays; the rest moves to the end.
    """
    keep = 0
    for key in have:
        if keep < len(want) and key == want[keep]:
            keep += 1
    return want[keep:]
