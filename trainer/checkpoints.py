"""Versioned checkpoints on any fsspec URI, the promotion gate, and the verified loader.

Layout under ``checkpoint_uri`` (a directory, ``file://``, ``s3://``, ``memory://`` ...)::

    <policy>/v000007/weights.safetensors   the weights (what the sha256 covers)
    <policy>/v000007/meta.json             version, sha256, metrics, config, trained_on,
                                           promoted, decision, created_at
    <policy>/promoted.json                 {version, uri, sha256} of the promoted policy

Versions are the next integer after the highest one present, so a restarted trainer
continues the sequence. A consumer verifies the weights' sha256 against the published one
before deserialising anything (:func:`load_checkpoint`).

Crash safety. A version is written whole under a temporary name (``.v000007.tmp-<id>``),
weights first, ``meta.json`` last, and then renamed to ``v000007`` (atomic on a local
filesystem). A version counts only when its ``meta.json`` and weights are both there, so a
directory left by a crash mid-write (or on a store whose rename is a copy) is ignored by
:meth:`CheckpointStore.versions` and :meth:`CheckpointStore.latest`; the next version
number still skips past it, so nothing is ever written over such a leftover.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, cast

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from stormline.schemas.models import CheckpointPublished, OffsetRange, stable_event_id
from stormline.trainer.policy import PolicyConfig, RouterNet, Scorer

WEIGHTS = "weights.safetensors"
META = "meta.json"
_VERSION = re.compile(r"v(\d{6,})$")
PROMOTED = "promoted.json"


class ChecksumMismatch(ValueError):
    """The weights file is not the one that was published: do not load it."""


class CheckpointNotFound(FileNotFoundError):
    pass


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str


def gate(candidate_loss: float, current_loss: float | None, margin: float) -> Decision:
    """Promote unless the held-out loss is worse than the current policy's by > margin."""
    if current_loss is None:
        return Decision(True, "promoted: no current policy")
    if candidate_loss != candidate_loss:  # nan: no held-out data to judge on
        return Decision(True, "promoted: no held-out experiences to compare on")
    if candidate_loss <= current_loss + margin:
        return Decision(
            True,
            f"promoted: holdout loss {candidate_loss:.4f} <= current {current_loss:.4f}"
            f" + margin {margin}",
        )
    return Decision(
        False,
        f"rejected: holdout loss {candidate_loss:.4f} > current {current_loss:.4f}"
        f" + margin {margin}",
    )


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _path(uri: str) -> str:
    """``uri`` as a path of its filesystem (what ``fs.mv`` takes)."""
    return str(fsspec.core.url_to_fs(uri)[1])


class CheckpointStore:
    def __init__(self, uri: str, policy: str) -> None:
        self.base = _join(uri, policy)
        self.policy = policy
        self.fs, self.root = fsspec.core.url_to_fs(self.base)

    def _numbered(self) -> list[int]:
        """Every ``vNNNNNN`` directory, complete or not."""
        if not self.fs.exists(self.root):
            return []
        out = []
        for p in self.fs.ls(self.root, detail=False):
            m = _VERSION.search(str(p).rstrip("/"))
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def complete(self, version: int) -> bool:
        d = f"{self.root.rstrip('/')}/v{version:06d}"
        return bool(self.fs.exists(f"{d}/{META}") and self.fs.exists(f"{d}/{WEIGHTS}"))

    def versions(self) -> list[int]:
        """The complete versions, oldest first (a crash's leftovers are not versions)."""
        return [v for v in self._numbered() if self.complete(v)]

    def uri_of(self, version: int) -> str:
        return _join(self.base, f"v{version:06d}")

    def write(
        self,
        state: dict[str, torch.Tensor],
        cfg: PolicyConfig,
        *,
        metrics: dict[str, float],
        trained_on: list[OffsetRange],
        promoted: bool,
        decision: str,
        extra: dict[str, Any] | None = None,
    ) -> CheckpointPublished:
        """Write a new version whole under a temporary name, then rename it complete."""
        version = (self._numbered() or [0])[-1] + 1
        uri = self.uri_of(version)
        blob = st_save(state)
        sha = hashlib.sha256(blob).hexdigest()
        meta = {
            "policy": self.policy,
            "version": version,
            "sha256": sha,
            "metrics": metrics,
            "config": cfg.to_dict(),
            "trained_on": [r.model_dump() for r in trained_on],
            "promoted": promoted,
            "decision": decision,
            "created_at": time.time(),
            **(extra or {}),
        }
        tmp = _join(self.base, f".v{version:06d}.tmp-{uuid.uuid4().hex[:8]}")
        with fsspec.open(_join(tmp, WEIGHTS), "wb") as f:
            f.write(blob)
        with fsspec.open(_join(tmp, META), "w") as f:  # meta last: it marks the version whole
            json.dump(meta, f, indent=2, sort_keys=True)
        self.fs.mv(_path(tmp), _path(uri), recursive=True)
        if promoted:
            self._write_promoted({"version": version, "uri": uri, "sha256": sha})
        return published_event(self, version, meta)

    def _write_promoted(self, pointer: dict[str, Any]) -> None:
        """Replace ``promoted.json`` by rename, so a reader never sees half of it."""
        tmp = _join(self.base, f".{PROMOTED}.tmp-{uuid.uuid4().hex[:8]}")
        with fsspec.open(tmp, "w") as f:
            json.dump(pointer, f)
        final = _join(self.base, PROMOTED)
        self.fs.mv(_path(tmp), _path(final))

    def promoted(self) -> tuple[str, str] | None:
        """(uri, sha256) of the promoted checkpoint, if any."""
        path = _join(self.base, PROMOTED)
        fs, p = fsspec.core.url_to_fs(path)
        if not fs.exists(p):
            return None
        with fsspec.open(path, "r") as f:
            d = json.load(f)
        return d["uri"], d["sha256"]

    def latest(self) -> tuple[str, str] | None:
        vs = self.versions()
        if not vs:
            return None
        meta = read_meta(self.uri_of(vs[-1]))
        return self.uri_of(vs[-1]), meta["sha256"]


def published_event(
    store: CheckpointStore, version: int, meta: dict[str, Any]
) -> CheckpointPublished:
    """The announcement of ``version``; its event id is stable, so a re-publication after a
    crash is the same event."""
    return CheckpointPublished(
        # The URI names the store, the policy and the version: one id per checkpoint anywhere.
        event_id=stable_event_id("checkpoint", store.uri_of(version)),
        policy=store.policy,
        version=version,
        uri=store.uri_of(version),
        sha256=meta["sha256"],
        metrics={k: float(v) for k, v in meta["metrics"].items()},
        trained_on=[OffsetRange.model_validate(r) for r in meta["trained_on"]],
        promoted=bool(meta["promoted"]),
        decision=meta["decision"],
    )


def read_meta(uri: str) -> dict[str, Any]:
    try:
        with fsspec.open(_join(uri, META), "r") as f:
            return cast(dict[str, Any], json.load(f))  # META is a JSON object (see save)
    except FileNotFoundError as exc:
        raise CheckpointNotFound(f"no checkpoint at {uri} ({META} missing)") from exc


def load_state_verified(
    uri: str, expected_sha256: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with fsspec.open(_join(uri, WEIGHTS), "rb") as f:
            blob = f.read()
    except FileNotFoundError as exc:
        raise CheckpointNotFound(f"no checkpoint weights at {uri}/{WEIGHTS}") from exc
    actual = hashlib.sha256(blob).hexdigest()
    if actual != expected_sha256:
        raise ChecksumMismatch(
            f"checkpoint {uri}: sha256 of {WEIGHTS} is {actual}, but {expected_sha256} was "
            "published. The file was changed or corrupted after publication; refusing to load "
            "it. Keep the previous policy and republish from the trainer."
        )
    return st_load(blob), read_meta(uri)


def load_checkpoint(
    event_or_uri: CheckpointPublished | str, expected_sha256: str | None = None
) -> Scorer:
    """Load a published checkpoint as a :class:`Scorer`, verifying its sha256 first.

    Pass the :class:`CheckpointPublished` event (its ``sha256`` is the expectation) or a
    checkpoint URI plus ``expected_sha256``. Raises :class:`ChecksumMismatch` if the weights
    file is not the one that was published; nothing is deserialised before the hash matches.
    """
    if isinstance(event_or_uri, CheckpointPublished):
        uri = event_or_uri.uri
        expected_sha256 = expected_sha256 or event_or_uri.sha256
    else:
        uri = event_or_uri
    if not expected_sha256:
        raise ValueError("load_checkpoint needs the published sha256 (from CheckpointPublished)")
    state, meta = load_state_verified(uri, expected_sha256)
    model = RouterNet(PolicyConfig.from_dict(meta["config"]))
    model.load_state_dict(state)
    return Scorer(model, version=int(meta["version"]), meta=meta)
