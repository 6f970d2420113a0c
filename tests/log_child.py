"""Child processes for tests/test_logs.py: each logs the way a Stormline service does.

``python -m tests.log_child handlers``: ``logs.setup()``, then a framework's own handler
added afterwards (as Faust does), ``install_redaction()`` as the router calls it, and
records carrying every kind of configured secret, in the message, its arguments and an
exception. ``python -m tests.log_child aiokafka TOPIC SECONDS``: an aiokafka consumer of
TOPIC, the one connection config, printing "consumed N" for each record, for SECONDS.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from stormline import logs
from stormline.runtime.connection import KafkaConnection
from stormline.settings import Settings


def handlers() -> None:
    logs.setup()
    plain = logging.StreamHandler(sys.stdout)  # no Stormline filter or formatter on it
    plain.setFormatter(logging.Formatter("%(name)s %(message)s"))
    logging.getLogger().addHandler(plain)
    getattr(logs, "install_redaction", lambda: None)()  # before it existed: nothing
    log = logging.getLogger("child")
    for name in ("GROQ_KEY", "STORMLINE_KAFKA_SASL_PASSWORD"):
        log.warning("%s is %s", name, os.environ[name])
    log.warning("redis at %s", os.environ["STORMLINE_REDIS_URL"])
    log.warning("registry at " + os.environ["STORMLINE_SCHEMA_REGISTRY_URL"])
    try:
        raise RuntimeError(f"provider said: bad key {os.environ['GROQ_KEY']}")
    except RuntimeError:
        log.exception("call failed")
    logging.getLogger("child.done").warning("done")


async def consume(topic: str, seconds: float) -> None:
    from aiokafka import AIOKafkaConsumer

    s = Settings()
    logs.setup()  # settings from the environment, as every service
    kw = {**KafkaConnection.from_settings(s).aiokafka(), "auto_offset_reset": "earliest"}
    consumer = AIOKafkaConsumer(topic, group_id=None, **kw)
    await consumer.start()
    print("started", flush=True)
    n = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        while loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                n += len(records)
                print(f"consumed {n}", flush=True)
    finally:
        await consumer.stop()


if __name__ == "__main__":
    if sys.argv[1] == "handlers":
        handlers()
    else:
        asyncio.run(consume(sys.argv[2], float(sys.argv[3])))
