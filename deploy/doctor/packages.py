"""Doctor group ``packages``: the venv's key packages import."""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Iterable

from stormline.deploy.doctor.base import REINSTALL, Check

# What the venv must be able to import for every Stormline service to start.
PACKAGES = (
    "confluent_kafka",
    "faust",
    "fastavro",
    "torch",
    "ray",
    "chdb",
    "openai",
    "anthropic",
    "redis",
    "pyarrow",
)
# Distribution names where they differ from the import name (for the version shown).
_DISTRIBUTIONS = {"confluent_kafka": "confluent-kafka", "faust": "faust-streaming"}


def check_packages(names: Iterable[str] = PACKAGES) -> list[Check]:
    out = []
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException as exc:  # a broken native library may raise anything
            if isinstance(exc, KeyboardInterrupt):
                raise
            out.append(
                Check(
                    f"package:{name}",
                    False,
                    f"import {name} failed: {type(exc).__name__}: {exc}",
                    REINSTALL,
                )
            )
            continue
        try:
            version = importlib.metadata.version(_DISTRIBUTIONS.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        out.append(Check(f"package:{name}", True, f"{name} {version} imports"))
    return out
