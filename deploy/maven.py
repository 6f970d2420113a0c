"""Run Maven for :mod:`stormline.deploy.jars` and watch it: one resolver per cache at a time,
progress while it downloads, and what its output says when it fails.

Maven runs with ``-B`` and without ``-q``/``-ntp``, so it prints one "Downloaded from" line per
file: those lines are what the progress report counts. Which goals run, and what a failure
means for the user, is :mod:`stormline.deploy.jars`' business.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

Report = Callable[[str], None]

_DOWNLOADING = re.compile(r"Downloading from [^:]+: (\S+)")
_DOWNLOADED = re.compile(r"Downloaded from [^:]+: (\S+)")


@dataclass
class Fetch:
    """What one Maven run downloaded."""

    what: str
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    current: str = ""


@dataclass
class MavenRun:
    """One Maven run: its progress, every line it printed, and how it exited."""

    fetch: Fetch
    lines: list[str] = field(default_factory=list)
    returncode: int = 0


@contextlib.contextmanager
def cache_lock(cache_dir: Path, report: Report) -> Iterator[None]:
    """One resolver at a time per cache: Maven's local repository is not safe to share."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".resolve.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            report(f"waiting for another Stormline process fetching into {cache_dir}")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def mirror_settings(cache_dir: Path, mirror_url: str) -> Path:
    """A Maven settings file that sends every request to ``mirror_url``."""
    path = cache_dir / "maven-mirror-settings.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "<settings><mirrors><mirror><id>stormline-mirror</id><mirrorOf>*</mirrorOf>"
        f"<url>{escape(mirror_url)}</url></mirror></mirrors></settings>\n"
    )
    return path


def run_maven(
    cmd: list[str], *, what: str, repo: Path, cwd: Path, report: Report, every_s: float
) -> MavenRun:
    """Run ``cmd`` to the end, reporting progress every ``every_s`` seconds while it downloads
    into the local repository ``repo``. The caller decides what a non-zero exit means."""
    run = MavenRun(Fetch(what))
    fetch = run.fetch
    start, before = time.monotonic(), tree_bytes(repo)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        bufsize=1,
        cwd=cwd,
    )
    reader = threading.Thread(target=_read_maven, args=(proc, run), daemon=True)
    reader.start()
    last = start
    while proc.poll() is None:
        time.sleep(0.25)
        now = time.monotonic()
        if now - last >= every_s and (fetch.files or fetch.current):
            last = now
            fetch.bytes = tree_bytes(repo) - before
            doing = f", fetching {fetch.current}" if fetch.current else ""
            report(
                f"{what}: {fetch.files} files, {mb(fetch.bytes)} downloaded "
                f"({now - start:.0f}s{doing})"
                if fetch.files
                else f"{what}: fetching {fetch.current} ({now - start:.0f}s)"
            )
    reader.join(timeout=10)
    fetch.seconds = time.monotonic() - start
    fetch.bytes = max(0, tree_bytes(repo) - before)
    fetch.current = ""
    run.returncode = proc.returncode
    return run


def _read_maven(proc: subprocess.Popen[str], run: MavenRun) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        run.lines.append(line)
        if m := _DOWNLOADING.search(line):
            run.fetch.current = m.group(1).rsplit("/", 1)[-1]
        elif _DOWNLOADED.search(line):
            run.fetch.files += 1
            run.fetch.current = ""


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, name)).st_size
    return total


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def missing_artifacts(lines: list[str]) -> list[str]:
    """The artifacts Maven said it could not find, each once, in order."""
    found = re.findall(r"Could not find artifact (\S+)", "\n".join(lines))
    return list(dict.fromkeys(found))


def maven_errors(lines: list[str]) -> str:
    """Maven's own error lines, without its boilerplate (else its last lines), at most six."""
    noise = ("[Help", "-> [Help", "To see the full", "Re-run Maven", "For more information")
    errors = [
        ln
        for ln in lines
        if ln.startswith("[ERROR]") and ln[7:].strip() and not ln[7:].strip().startswith(noise)
    ]
    return "\n".join((errors or lines[-6:])[:6])
