"""A bare Faust agent that forwards records (consume 1, produce 1): the router's yardstick.

``python -m bench.forwarder SOURCE SINK`` runs it with the router's own Faust settings
(streams.kafka.faust_app: one connection config, the same producer and commit settings) on a
throw-away app id, so the router's CPU per routed task can be read in units of this one's
CPU per forwarded record, measured in the same run on the same broker (bench/router.py).
"""

from __future__ import annotations

import sys
from typing import Any

from stormline.settings import Settings
from stormline.streams.kafka import faust_app


def main(source: str, sink: str) -> None:
    s = Settings()
    s = s.model_copy(update={"router_app_id": f"bench-forwarder-{source}"})
    app = faust_app(s, s.default_partitions, 1)
    src = app.topic(source, key_serializer="raw", value_serializer="raw")
    out = app.topic(sink, key_serializer="raw", value_serializer="raw")

    @app.agent(src, name="forward")
    async def forward(stream: Any) -> None:
        async for ev in stream.events():
            await out.send(key=ev.key, value=ev.value)

    sys.argv = ["bench-forwarder", "worker", "--loglevel", "warn", "--without-web"]
    app.main()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
