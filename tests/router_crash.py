"""A router process that kills itself (SIGKILL, as kill -9 would) inside one of its windows,
or stops itself (SIGTERM, as ``stormline down`` would) with a batch in hand.

``python -m tests.router_crash between-final-events``: after the router's final-failure
Trajectory is delivered and before its Reward is sent; ``before-assignment``: after the task's
record reached its changelog and before its TaskAssigned is sent. ``stop-before-decisions``
and ``stop-in-finish``: a batch with a task whose id starts with ``stop-`` sends SIGTERM to its
own process and waits there, so that the graceful stop cancels it, before anything in it is
decided or after the decisions and before their table writes. ``never-delivered``: the first
Faust delivery of each record keyed ``drop-...`` never reaches the router. Otherwise it is
``stormline router`` (:func:`stormline.streams.app.run_router`), settings from the environment.
The kill hooks wrap :meth:`Router.finish`, the one way the router sends what it decided, and
flush Faust's producer first, so the table's changelog records are out when it dies.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

from stormline.schemas.models import ROUTER_AGENT, TaskAssigned, Trajectory
from stormline.settings import Settings
from stormline.streams import app as router_app


def _die(what: str) -> None:
    sys.stderr.write(f"router_crash: SIGKILL {what}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def hook(window: str) -> None:
    finish, handle = router_app.Router.finish, router_app.Router.handle

    async def stop_here() -> None:
        sys.stderr.write(f"router_crash: SIGTERM in {window}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(3600)  # cancelled here by the stop

    dropped: set[bytes] = set()

    async def handle_hook(self: Any, events: list[Any]) -> None:
        if window == "stop-before-decisions" and any(
            (e.message.key or b"").startswith(b"stop-") for e in events
        ):
            await stop_here()
        if window == "never-delivered":
            # As faust-streaming does now and then after a restart: a record that is never
            # delivered to the agent (and so never acked). Only Faust's own delivery is
            # dropped, once per key; the router's own reads (plain records) pass.
            kept = []
            for e in events:
                key = e.message.key or b""
                if key.startswith(b"drop-") and key not in dropped and hasattr(e, "ack"):
                    dropped.add(key)
                    e.message.incref()  # never acked: the offset stays uncommitted
                    sys.stderr.write(f"router_crash: {key.decode()} never delivered\n")
                    sys.stderr.flush()
                else:
                    kept.append(e)
            events = kept
        await handle(self, events)

    async def finish_hook(self: Any, batch: router_app.Batch) -> None:
        events = [e for e, _, _ in batch.events]
        if window == "between-final-events":
            final = [
                (e, src, h)
                for e, src, h in batch.events
                if isinstance(e, Trajectory) and e.agent_id == ROUTER_AGENT
            ]
            if final:
                await self.app.producer.flush()
                for e, src, h in final:
                    await self._send(e, src, h)
                _die("between the final Trajectory and its Reward")
        elif window == "before-assignment" and any(isinstance(e, TaskAssigned) for e in events):
            await self.app.producer.flush()
            _die("before sending TaskAssigned")
        elif window == "stop-in-finish" and any(
            isinstance(e, TaskAssigned) and e.task_id.startswith("stop-") for e in events
        ):
            await stop_here()
        await finish(self, batch)

    router_app.Router.finish = finish_hook  # type: ignore[method-assign]
    router_app.Router.handle = handle_hook  # type: ignore[method-assign]


if __name__ == "__main__":
    hook(sys.argv[1])
    router_app.run_router(Settings(), loglevel="warning")
