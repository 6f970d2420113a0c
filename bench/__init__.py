"""bench/: the benchmark suite (`make bench`), separate from the tests.

Each module ``bench/<part>.py`` exposes ``run(quick: bool = False) -> dict[str, float | str]``
returning self-explaining figures. ``python -m bench`` runs them, repeats each, reports the
median with its spread, and writes ``bench/results.md`` and ``bench/results.json``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


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
