"""deploy/: the embedded local stack (``stack.py``) and the files that run Stormline elsewhere.

``stack.py`` is the entry module: ``EmbeddedStack.up() / down() / status()`` start, stop and
inspect a real Apache Kafka broker (KRaft), an Apicurio schema registry and a redis-server on
loopback, plus chDB on disk; each service starts itself (``stack_kafka.py``,
``stack_servers.py``) on what ``stack_base.py`` shares. Jars come from Maven Central through
``jars.py`` (which runs Maven through ``maven.py``); processes are tracked by pid files through
``process.py``. ``doctor/`` checks the machine before anything starts, one module per group.
"""
