"""What every doctor check returns (:class:`Check`) and the groups they run in (:class:`Group`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum

REINSTALL = "reinstall the venv: `make setup` (it installs requirements.lock)"


class Group(StrEnum):
    JAVA = "java"
    MAVEN = "maven"
    PORTS = "ports"
    DATA_DIR = "data-dir"
    PACKAGES = "packages"
    AGENTS = "agents"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    skipped: bool = False  # nothing to check (e.g. no agents file); ok is True

    def as_dict(self) -> dict[str, object]:
        return asdict(self)
