"""schemas/: the event contracts every other part builds on. Imports no other part.

* ``avro/*.avsc`` — one Avro schema per event; ``released/<n>/`` — what release n shipped.
* ``models.py``  — one pydantic model per event, the whole data model in one place.
* ``serde.py``   — the one serde (Confluent wire format, registry ids).
* ``catalog.py`` — the one topic catalog.
* ``kafka.py``   — typed producer, batch consumer with dead letters, topic admin.
* ``compat.py``  — backward-compatibility check against the last release.
"""
