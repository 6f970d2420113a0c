"""bench/: the benchmark suite (`make bench`), separate from the tests.

Each module ``bench/<part>.py`` exposes ``run(quick: bool = False) -> dict[str, float | str]``
returning self-explaining figures. ``python -m bench`` runs them, repeats each, reports the
median with its spread, and writes ``bench/results.md`` and ``bench/results.json``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stormline.settings import Settings


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (from /proc), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-th percentile of ``xs`` (nearest rank); NaN for no values."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def child_env(s: Settings, **extra: str) -> dict[str, str]:
    """The environment of a Stormline process the bench starts: ``s`` as STORMLINE_*
    variables (secrets by value), nothing of this shell's STORMLINE_*, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORMLINE_")}
    for name, value in s.model_dump().items():
        if value is not None:
            env[f"STORMLINE_{name.upper()}"] = (
                value.get_secret_value() if hasattr(value, "get_secret_value") else str(value)
            )
    return {**env, **extra}
