"""Loading a trainer checkpoint as a scorer for the router, behind one function.

The contract with ``trainer/`` is one function,
``stormline.trainer.checkpoints.load_checkpoint(event)``, which returns an object with
``score(task, agent_ids, capabilities) -> {agent_id: score}``, in reward units, which the
router blends with the Q-table (``STORMLINE_ROUTER_POLICY_WEIGHT``). The trainer's loader
verifies the published sha256 of the weights before anything is deserialised.

:func:`load_policy` never raises: on any problem (unreadable file, sha256 mismatch, not
promoted) it logs why and returns None, and the router goes on with its
Q-table alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

from stormline.schemas.models import CheckpointPublished, TaskSubmitted

log = logging.getLogger("stormline.router.policy")


class Scorer(Protocol):
    def score(
        self,
        task: TaskSubmitted,
        agent_ids: list[str],
        capabilities: dict[str, list[str]],
    ) -> Mapping[str, float]: ...


def load_policy(event: CheckpointPublished) -> Scorer | None:
    """The scorer for ``event``'s checkpoint, or None (logged) if it cannot be used."""
    if not event.promoted:
        log.info("checkpoint %s not promoted (%s); ignored", event.policy_version, event.decision)
        return None
    # Imported here: torch is only paid for once a checkpoint is promoted.
    from stormline.trainer.checkpoints import load_checkpoint

    try:
        scorer = load_checkpoint(event)
    except Exception as exc:  # a checksum mismatch lands here too, with its explanation
        log.warning("policy %s not loaded: %s; keeping the Q-table", event.policy_version, exc)
        return None
    log.info("loaded policy %s from %s", event.policy_version, event.uri)
    return scorer
