"""The runtime kernel: what every Stormline process stands on to talk to Kafka.

* ``connection.py``   - the one connection config: confluent-kafka and aiokafka/Faust client
  settings (security included) from the settings.
* ``producer.py``     - the byte-level producer (idempotent, acks=all, murmur2, delivery errors).
* ``consumer.py``     - a group member with the one commit discipline; a never-committing reader.
* ``commits.py``      - the one commit discipline (offset tracking, commits off the poll thread).
* ``admin.py``        - the admin client, ``ensure_topics`` (once), topic configs, end offsets.
* ``partitioning.py`` - the one murmur2 and which partition a key lands on.
* ``retry.py``        - the one retry policy (exponential backoff, full jitter; tenacity).

Events, the serde, the topic catalog and dead letters are ``stormline.schemas``' (its
``kafka.py`` is the typed layer over this one). The kernel imports nothing of Stormline's
but the settings and the logs.
"""
