"""Backward compatibility: can the current schemas read what the last release wrote?

Every released version's schemas are kept in ``released/<version>/``. The check writes
records generated from the released schema and reads them back with the current one
(fastavro's schema resolution, the same code path as decoding). With a registry it also
asks the registry's compatibility endpoint (BACKWARD) on a scratch subject.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import fastavro
from fastavro.utils import generate_many

from stormline.schemas.models import EVENT_TYPES, Event
from stormline.schemas.serde import AVRO_DIR, RELEASED_DIR, schema_file


@dataclass
class CompatResult:
    event: str
    released: str
    compatible: bool
    method: str
    problem: str = ""


def latest_release() -> Path:
    versions = sorted((p for p in RELEASED_DIR.iterdir() if p.is_dir()), key=lambda p: int(p.name))
    return versions[-1]


def resolution_problem(writer_json: str, reader_json: str, samples: int = 200) -> str:
    """Empty if records written with ``writer_json`` are readable with ``reader_json``."""
    writer = fastavro.parse_schema(json.loads(writer_json))
    reader = fastavro.parse_schema(json.loads(reader_json))
    for record in generate_many(writer, samples):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, writer, record)
        buf.seek(0)
        try:
            fastavro.schemaless_reader(buf, writer, reader)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
    return ""


def check(
    current_dir: Path = AVRO_DIR,
    registry_url: str | None = None,
    events: tuple[type[Event], ...] = EVENT_TYPES,
) -> list[CompatResult]:
    release = latest_release()
    results = []
    for ev in events:
        old = (
            (release / schema_file(ev)).read_text()
            if (release / schema_file(ev)).exists()
            else None
        )
        new = (current_dir / schema_file(ev)).read_text()
        if old is None:
            results.append(CompatResult(ev.__name__, release.name, True, "new event"))
            continue
        problem = resolution_problem(old, new)
        results.append(CompatResult(ev.__name__, release.name, not problem, "fastavro", problem))
        if registry_url and registry_url.lower() not in {"none", "off"}:
            ok = registry_compatible(registry_url, old, new)
            results.append(
                CompatResult(
                    ev.__name__,
                    release.name,
                    ok,
                    "registry",
                    "" if ok else "registry says not BACKWARD compatible",
                )
            )
    return results


def registry_compatible(url: str, old: str, new: str) -> bool:
    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

    client = SchemaRegistryClient({"url": url, "timeout": 10})
    subject = f"stormline-compat-check.{uuid.uuid4().hex}"
    client.register_schema(subject, Schema(old, "AVRO"))
    client.set_compatibility(subject, "BACKWARD")
    try:
        return bool(client.test_compatibility(subject, Schema(new, "AVRO")))
    finally:
        try:
            client.delete_subject(subject, permanent=False)
            client.delete_subject(subject, permanent=True)
        except Exception:
            pass
