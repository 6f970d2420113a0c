"""The embedded broker's cluster id never looks like a command-line option to Kafka's tools."""

from __future__ import annotations

import base64

from stormline.deploy.stack import _cluster_id


def test_cluster_ids_never_start_with_a_dash() -> None:
    ids = [_cluster_id() for _ in range(5000)]  # a plain uuid starts with '-' 1 time in 64
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(base64.urlsafe_b64decode(i + "==")) == 16 for i in ids)
    assert len(set(ids)) == len(ids)
