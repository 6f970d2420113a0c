"""What the embedded stack's services share: where their files go (:class:`StackPaths`), what
``status`` reports (:class:`ServiceStatus`), and :class:`StackContext`, which every starter
(``stack_kafka.py``, ``stack_servers.py``) and the facade (``stack.py``) hold: the settings, the
Java and jars (resolved once, for Kafka and the registry alike), and the pid-file, readiness
and free-port checks.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stormline.deploy import process
from stormline.deploy.errors import StackError
from stormline.deploy.jars import JarResolver, Jars
from stormline.deploy.java import Java, find_java
from stormline.settings import Settings

Report = Callable[[str], None]
NOT_RUNNING = "not running (stormline up starts it)"


@dataclass
class ServiceStatus:
    name: str
    address: str
    healthy: bool
    version: str = ""
    managed: bool = True  # False: configured externally, not started by Stormline
    running: bool = False
    detail: str = ""
    pid: int | None = None

    def as_dict(self) -> dict[str, object]:
        return self.__dict__.copy()


@dataclass
class StackPaths:
    root: Path
    run: Path = field(init=False)
    logs: Path = field(init=False)
    kafka: Path = field(init=False)
    redis: Path = field(init=False)

    def __post_init__(self) -> None:
        self.run = self.root / "run"
        self.logs = self.root / "logs"
        self.kafka = self.root / "kafka"
        self.redis = self.root / "redis"

    def pidfile(self, name: str) -> Path:
        return self.run / f"{name}.pid"

    def logfile(self, name: str) -> Path:
        return self.logs / f"{name}.log"


class StackContext:
    def __init__(self, settings: Settings, report: Report | None = None) -> None:
        self.s = settings
        self.paths = StackPaths(settings.data_dir.resolve())
        self.report: Report = report or (lambda _msg: None)
        self._jars: Jars | None = None
        self._java_rt: Java | None = None

    def jars(self) -> Jars:
        if self._jars is None:
            self.report("resolving jars (fetched from Maven Central once, then cached)")
            self._jars = JarResolver.from_settings(self.s, report=self.report).resolve()
        return self._jars

    def java(self) -> Java:
        """The Java 21+ that runs the broker and the registry (deploy/java.py says which)."""
        if self._java_rt is None:
            self._java_rt = find_java(self.s.java)
        return self._java_rt

    def alive(self, name: str, marker: tuple[str, ...]) -> int | None:
        pid = process.running_pid(self.paths.pidfile(name), marker[0])
        return pid if pid is not None and self.owned(pid, marker) else None

    @staticmethod
    def owned(pid: int, marker: tuple[str, ...]) -> bool:
        cmd = process.cmdline(pid)
        return all(m in cmd for m in marker)

    def managed_status(self, st: ServiceStatus, name: str, marker: tuple[str, ...]) -> bool:
        """Fill in the pid of the managed service ``name``; False when it is not running (the
        status is then complete)."""
        st.pid = self.alive(name, marker)
        st.running = st.pid is not None
        if not st.running:
            st.detail = NOT_RUNNING
        return st.running

    def wait(
        self,
        name: str,
        proc: subprocess.Popen[bytes],
        ready: Callable[[], bool],
        *,
        timeout: float,
        hint: str = "",
    ) -> None:
        deadline = time.monotonic() + timeout
        logfile = self.paths.logfile(name)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise StackError(
                    f"{name} exited while starting. Last lines of {logfile}:\n"
                    f"{process.tail(logfile)}\n{hint}".rstrip()
                )
            if ready():
                return
            time.sleep(0.5)
        raise StackError(
            f"{name} did not become ready within {timeout:.0f}s. "
            f"Last lines of {logfile}:\n{process.tail(logfile)}"
        )

    @staticmethod
    def require_free(port: int, what: str, setting: str) -> None:
        if not process.port_is_free(port):
            raise StackError(
                f"Port {port} on 127.0.0.1 is taken by another program, so the "
                f"embedded {what} cannot listen there. Stop that program or set "
                f"{setting} to a free port."
            )


def quiet_jdk_flags(java: Java) -> list[str]:
    """Java 24+ warns at start-up about sun.misc.Unsafe and JNI use that Kafka's and Quarkus's
    libraries still make; allow both so the logs show only what matters."""
    flags = []
    if java.major >= 23:
        flags.append("--sun-misc-unsafe-memory-access=allow")
    if java.major >= 24:
        flags.append("--enable-native-access=ALL-UNNAMED")
    return flags
