"""A trainer process that kills itself (SIGKILL, as kill -9 would) at one point of an update.

``python -m tests.trainer_crash after-publish``: right after the CheckpointPublished record
is delivered; ``after-checkpoint``: right after the checkpoint is written. Otherwise it is
``stormline trainer`` (:func:`stormline.trainer.service.serve`), settings from the
environment. The hooks wrap the public calls an update makes, so they hit the same point
whatever order the service makes them in.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from stormline.schemas.kafka import EventProducer
from stormline.schemas.models import CheckpointPublished
from stormline.settings import Settings
from stormline.trainer import service
from stormline.trainer.checkpoints import CheckpointStore


def _die() -> None:
    sys.stderr.write("trainer_crash: SIGKILL now\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def after_publish() -> None:
    produce, flush = EventProducer.produce, EventProducer.flush
    sent: list[bool] = []

    def produce_hook(self: EventProducer, event: Any, **kw: Any) -> None:
        produce(self, event, **kw)
        if isinstance(event, CheckpointPublished):
            sent.append(True)

    def flush_hook(self: EventProducer, timeout: float = 30.0) -> None:
        flush(self, timeout)
        if sent:
            _die()

    EventProducer.produce = produce_hook  # type: ignore[method-assign]
    EventProducer.flush = flush_hook  # type: ignore[method-assign]


def after_checkpoint() -> None:
    write = CheckpointStore.write

    def write_hook(self: CheckpointStore, *a: Any, **kw: Any) -> CheckpointPublished:
        out = write(self, *a, **kw)
        _die()
        return out

    CheckpointStore.write = write_hook  # type: ignore[method-assign]


if __name__ == "__main__":
    {"after-publish": after_publish, "after-checkpoint": after_checkpoint}[sys.argv[1]]()
    service.serve(Settings())
