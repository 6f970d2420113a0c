"""Per-process CPU profiles for the benchmarks: py-spy samples, summed by library.

A figure such as "the router costs 4 ms of CPU per task" says how much, not why. While a
benchmark's window runs, :class:`Profiles` samples each named process with ``py-spy record
--nonblocking`` (the process is never paused) into ``bench/profiles/<name>.txt`` (collapsed
stacks, one line per distinct stack with its sample count). :func:`summary` then charges
every sample to the library whose code was running (the innermost frame that is not the
standard library's plumbing), so "aiokafka 31%" means 31% of that process's busy samples
were inside aiokafka, and with the process's CPU per task that is a cost in milliseconds.
"""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import sys
from pathlib import Path

PROFILES = Path(__file__).parent / "profiles"
RATE_HZ = 100

# Where a frame's file lives -> the library it is charged to. First match wins.
_LIBRARIES = [
    ("faust", "/faust/"),
    ("mode", "/mode/"),
    ("aiokafka", "/aiokafka/"),
    ("kafka-python", "/kafka/"),
    ("confluent-kafka", "/confluent_kafka/"),
    ("fastavro", "/fastavro/"),
    ("pydantic", "/pydantic"),
    ("redis", "/redis/"),
    ("openai", "/openai/"),
    ("anthropic", "/anthropic/"),
    ("httpx", "/httpx"),
    ("httpcore", "/httpcore/"),
    ("aiohttp", "/aiohttp/"),
    ("opentelemetry", "/opentelemetry/"),
    ("prometheus", "/prometheus_client/"),
    ("yarl/multidict", "/yarl/"),
]
ROOT = str(Path(__file__).resolve().parents[1])  # this clone: Stormline's own code
# py-spy's raw line (with --full-filenames): "func (file:line);func (file:line) count"
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+)(?::\d+)?\)$")


def _library(path: str) -> str | None:
    for name, marker in _LIBRARIES:
        if marker in path:
            return name
    if path.startswith(ROOT) and "/site-packages/" not in path:
        return "stormline"
    return None


def _charge(frames: list[str]) -> tuple[str, str]:
    """(library, innermost function) for one stack, innermost frame last."""
    for frame in reversed(frames):
        m = _FRAME.match(frame)
        if not m:
            continue
        lib = _library(m["file"])
        if lib is not None:
            return lib, f"{m['func']} ({Path(m['file']).name})"
    # Only the standard library on the stack: asyncio's loop, selectors, json, ssl...
    leaf = _FRAME.match(frames[-1]) if frames else None
    return "python stdlib", f"{leaf['func']} ({Path(leaf['file']).name})" if leaf else "?"


def summary(path: Path, cpu_ms_per_task: float | None = None, top: int = 6) -> str:
    """One line: each library's share of the busy samples (and ms per task), top functions."""
    by_lib: collections.Counter[str] = collections.Counter()
    by_func: collections.Counter[str] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        lib, func = _charge(stack.split(";"))
        by_lib[lib] += int(count)
        by_func[func] += int(count)
    total = sum(by_lib.values())
    if not total:
        return "no samples"

    def share(n: int) -> str:
        pct = f"{100 * n / total:.0f}%"
        return f"{pct} = {cpu_ms_per_task * n / total:.2f} ms" if cpu_ms_per_task else pct

    libs = ", ".join(f"{lib} {share(n)}" for lib, n in by_lib.most_common(top + 2))
    funcs = ", ".join(f"{f} {100 * n / total:.0f}%" for f, n in by_func.most_common(top))
    return f"{total} samples; by library: {libs}; hottest: {funcs}"


def spy_argv(pid: int, output: Path, fmt: str = "raw") -> list[str]:
    """The one py-spy command line of the benchmarks: sample ``pid`` without pausing it."""
    spy = Path(sys.executable).parent / "py-spy"
    argv = [str(spy), "record", "--nonblocking", "--rate", str(RATE_HZ), "--format", fmt]
    return [*argv, "--full-filenames", "--pid", str(pid), "--output", str(output)]


class Profiles:
    """py-spy on each of ``pids`` until :meth:`stop`; files under ``bench/profiles/``."""

    def __init__(self, prefix: str, pids: dict[str, int]) -> None:
        PROFILES.mkdir(exist_ok=True)
        self.paths = {name: PROFILES / f"{prefix}{name}.txt" for name in pids}
        self._procs = [
            subprocess.Popen(
                spy_argv(pid, self.paths[name]),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, pid in pids.items()
        ]

    def stop(self) -> dict[str, Path]:
        """Stop sampling (py-spy writes its file on SIGINT); the files that were written."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self._procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        return {name: p for name, p in self.paths.items() if p.exists() and p.stat().st_size}
