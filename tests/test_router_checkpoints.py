"""Issue 18: a checkpoint version the router could not load is not marked seen; it is retried."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from stormline.schemas.models import CheckpointPublished
from stormline.settings import Settings
from stormline.streams.app import Router


def test_a_checkpoint_that_did_not_load_is_retried_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    r = Router(Settings(data_dir=tmp_path, router_replication=1))
    ev = CheckpointPublished(
        policy="router", version=3, uri=f"{tmp_path}/not-there-yet", sha256="0" * 64
    )
    with caplog.at_level(logging.WARNING, "stormline.router"):
        assert not asyncio.run(r._load_checkpoint(ev))
    assert r.policies == {}  # before: version 3 was marked seen and never tried again
    event, failures, at = r._retry_checkpoint["router"]
    assert (event, failures) == (ev, 1) and at > 0
    assert "checkpoint router v3 not loaded (try 1); retrying in 2s" in caplog.text
    r._retry_checkpoint["router"] = (ev, 1, 0.0)  # due now
    asyncio.run(r._retry_checkpoints())
    assert r._retry_checkpoint["router"][1] == 2 and r.extra["policy_load_failures"] == 2
    # A newer version replaces the pending one; an older or equal one seen later is ignored.
    newer = ev.model_copy(update={"version": 4, "uri": f"{tmp_path}/v4"})
    asyncio.run(r._load_checkpoint(newer))
    assert r._retry_checkpoint["router"][0].version == 4
