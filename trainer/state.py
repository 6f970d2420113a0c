"""Durable training state: one local JSON file, written atomically with the offsets it covers.

Design. The trainer's join state (pending trajectories, rewards and assignments, joined ids
for duplicate suppression) and its buffer of joined-but-not-yet-trained experiences are
saved together with ``positions``: for every (topic, partition), the next offset whose
record is *not* yet reflected in the file. The file is written to a temporary name, fsynced
and renamed over the old one, so it is always a complete snapshot.

Order of operations (see :class:`trainer.service.TrainerService`): apply records -> (train,
write the checkpoint whole, then save this file with the trained experiences gone from the
buffer, ``version`` set to the checkpoint's and its CheckpointPublished in ``outbox`` ->
publish the outbox, flush) -> save this file -> commit the same positions to Kafka. Kafka's
committed offsets therefore never run ahead of the file. After a crash the consumer resumes
from the committed offsets, which may be *behind* the file; the service skips every record
below the file's position for its partition, because the file already holds its effect.
Nothing is lost (records not in the file are redelivered) and nothing is joined twice.

The crash windows of an update: killed after the checkpoint is written but before this file
is saved, the restart finds a checkpoint of its own group newer than ``version``: its
trained trajectories are marked joined (their records come again and are dropped) and its
event is published. Killed after the save, the outbox is published again at the restart,
under the same event id. Either way each experience is trained once.

The file lives under ``<data_dir>/trainer/``; one trainer process owns a consumer group's
partitions (Ray scales the training, not the consuming).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stormline.schemas.models import CheckpointPublished
from stormline.trainer.join import Experience, Joiner

FORMAT = 2


@dataclass
class TrainerState:
    joiner: Joiner
    positions: dict[tuple[str, int], int] = field(default_factory=dict)
    buffer: list[Experience] = field(default_factory=list)
    # The newest checkpoint version this state reflects (None: a state of format 1).
    version: int | None = 0
    # Checkpoints written but not known to be published yet.
    outbox: list[CheckpointPublished] = field(default_factory=list)

    def applied(self, topic: str, partition: int, offset: int) -> bool:
        return offset < self.positions.get((topic, partition), 0)

    def advance(self, topic: str, partition: int, offset: int) -> None:
        key = (topic, partition)
        self.positions[key] = max(self.positions.get(key, 0), offset + 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": self.version,
            "outbox": [e.model_dump(mode="json") for e in self.outbox],
            "positions": [[t, p, o] for (t, p), o in sorted(self.positions.items())],
            "join": self.joiner.to_dict(),
            "buffer": [e.model_dump(mode="json") for e in self.buffer],
        }


def state_path(data_dir: Path, group_id: str) -> Path:
    return Path(data_dir) / "trainer" / f"{group_id}.state.json"


def save(path: Path, state: TrainerState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(state.to_dict(), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: Path, joiner: Joiner) -> TrainerState:
    """The saved state, or a fresh one around ``joiner`` if there is no file yet."""
    if not path.exists():
        return TrainerState(joiner, version=None)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RuntimeError(
            f"trainer state {path} is unreadable ({exc}); move it aside to start the join "
            "afresh from the committed offsets"
        ) from exc
    joiner.load_dict(d.get("join", {}))
    return TrainerState(
        joiner,
        positions={(t, int(p)): int(o) for t, p, o in d.get("positions", [])},
        buffer=[Experience.model_validate(e) for e in d.get("buffer", [])],
        version=d.get("version"),
        outbox=[CheckpointPublished.model_validate(e) for e in d.get("outbox", [])],
    )
