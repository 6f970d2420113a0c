"""Child processes for tests/test_logs.py: each logs the way a Stormline service does.

``python -m tests.log_child handlers``: ``logs.setup()``, then a framework's own handler
added afterwards (as Faust does), ``install_redaction()`` as the router calls it, and
records carrying every kind of configured secret, in the message, its arguments and an
exception. ``python -m tests.log_child aiokafka TOPIC SECONDS``: an aiokafka consumer of
TOPIC, the one connection config, printing "consumed N" for each record, for SECONDS.
``python -m tests.log_child http URL``: as a worker does, ``logs.setup()`` and tracing from
the environment, then one LLM call per SDK transport to the simulator at URL, inside a task's
log context and a span, and a line saying so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

from stormline import logs, tracing
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


async def http(url: str) -> None:
    from stormline.consumers.llm import CompletionRequest
    from stormline.consumers.llm.agents import ProviderConfig
    from stormline.consumers.llm.providers import make_provider

    logs.setup(service="child")
    tracing.setup(Settings(), "child")
    log = logging.getLogger("child")
    req = CompletionRequest(agent_id="agent-7", model="sim-0", prompt="What is 1 + 2?")
    with logs.bound(task_id="task-42", agent="agent-7"), tracing.root("child.task"):
        for transport in ("aiohttp", "httpx"):
            cfg = ProviderConfig(provider="openai", model="sim-0", base_url=f"{url}/v1")
            provider = make_provider(cfg, transport=transport)  # type: ignore[arg-type]
            try:
                await provider.complete(req)
            finally:
                await provider.aclose()
            log.warning("called over %s", transport)
    log.warning("outside the task")
    tracing.shutdown()  # the console exporter's lines before the process ends


if __name__ == "__main__":
    if sys.argv[1] == "handlers":
        handlers()
    elif sys.argv[1] == "http":
        asyncio.run(http(sys.argv[2]))
    else:
        asyncio.run(consume(sys.argv[2], float(sys.argv[3])))
