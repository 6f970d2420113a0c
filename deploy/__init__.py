"""deploy/: the embedded local stack (``stack.py``) and the files that run Stormline elsewhere.

``stack.py`` is the entry module: ``EmbeddedStack.up() / down() / status()`` start, stop and
inspect a real Apache Kafka broker (KRaft), an Apicurio schema registry and a redis-server on
loopback, plus chDB on disk. Jars come from Maven Central through ``jars.py``; processes are
tracked by pid files through ``process.py``.
"""
