"""The embedded stack: a real Kafka broker (KRaft), an Apicurio registry, redis-server, chDB.

``up`` starts what is not running and reuses what is; ``down`` stops only what ``up``
started (pid file plus command-line marker); ``status`` reports each service's version,
address and health. A service whose address is set in :class:`Settings` is external: it is
checked, never started or stopped.

Data lives under ``settings.data_dir``; downloads under ``settings.cache_dir``. Nothing here
ever deletes data: a data directory that looks wrong stops ``up`` with a message instead.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stormline.deploy import process
from stormline.deploy.errors import StackError
from stormline.deploy.jars import JarResolver, Jars
from stormline.deploy.java import Java, find_java
from stormline.deploy.kafka_probe import metadata_version_level, release_of_metadata_level
from stormline.settings import Settings

Report = Callable[[str], None]
# librdkafka logs every refused connection while a broker starts; health checks want silence.
_QUIET = logging.getLogger("stormline.stack.librdkafka")
_QUIET.setLevel(logging.CRITICAL)
_QUIET.propagate = False


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
class _Paths:
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


class EmbeddedStack:
    def __init__(self, settings: Settings, report: Report | None = None) -> None:
        self.s = settings
        self.paths = _Paths(settings.data_dir.resolve())
        self.report: Report = report or (lambda _msg: None)
        self._jars: Jars | None = None
        self._java_rt: Java | None = None

    # ===================================================================== public API ==
    def up(self) -> list[ServiceStatus]:
        if self.s.kafka_bootstrap_servers is None:
            self._up_kafka()
        if self.s.schema_registry_url is None:
            self._up_registry()
        if self.s.redis_url is None:
            self._up_redis()
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.s.chdb_path.mkdir(parents=True, exist_ok=True)
        return self.status()

    # ------------------------------------------------------------- Stormline services --
    def _supervisor_marker(self) -> tuple[str, ...]:
        return ("stormline.deploy.supervisor", f"--data-dir {self.paths.root}")

    def up_services(self, workers: int = 2, simulator: bool = True, trainer: bool = True) -> int:
        """Start the supervisor of router, workers, evaluator, sink, trainer (and simulator)."""
        from stormline.schemas.kafka import ensure_topics
        from stormline.schemas.serde import Serde

        pid = self._alive("supervisor", self._supervisor_marker())
        if pid is not None:
            self.report(f"services already supervised (pid {pid}), reusing them")
            return pid
        ensure_topics(self.s)
        serde = Serde.from_settings(self.s)
        from stormline.schemas.catalog import CATALOG

        for spec in CATALOG:
            serde.register(spec.name(self.s), spec.event)
        argv = [
            sys.executable,
            "-m",
            "stormline.deploy.supervisor",
            "--data-dir",
            str(self.paths.root),
            "--workers",
            str(workers),
        ]
        argv += [] if simulator else ["--no-simulator"]
        argv += [] if trainer else ["--no-trainer"]
        self.report(
            f"starting services: router, {workers} workers, evaluator, sink"
            + (", trainer" if trainer else "")
            + (", simulate-llm" if simulator else "")
        )
        from stormline.deploy.supervisor import settings_environ

        # The supervisor and its children see exactly these settings, CLI flags included.
        proc = process.start_daemon(
            argv,
            pidfile=self.paths.pidfile("supervisor"),
            logfile=self.paths.logfile("supervisor"),
            env=settings_environ(self.s),
        )
        return proc.pid

    def services(self) -> list[dict[str, object]]:
        """The supervised services and their pids, as the supervisor last wrote them."""
        state = self.paths.run / "services.json"
        if self._alive("supervisor", self._supervisor_marker()) is None or not state.exists():
            return []
        rows: list[dict[str, object]] = json.loads(state.read_text())
        for row in rows:
            pid = row.get("pid")
            row["running"] = isinstance(pid, int) and bool(process.cmdline(pid))
        return rows

    def down(self) -> list[str]:
        stopped = []
        for name, marker in (
            ("supervisor", self._supervisor_marker()),
            ("registry", self._registry_marker()),
            ("redis", self._redis_marker()),
            ("kafka", self._kafka_marker()),
        ):
            pid = process.running_pid(self.paths.pidfile(name), marker[0])
            if pid is not None and self._owned(pid, marker):
                self.report(f"stopping {name} (pid {pid})")
                process.stop_pid(pid, marker[0], timeout=60)
                stopped.append(name)
            self.paths.pidfile(name).unlink(missing_ok=True)
        return stopped

    def status(self) -> list[ServiceStatus]:
        return [
            self._kafka_status(),
            self._registry_status(),
            self._redis_status(),
            self._clickhouse_status(),
        ]

    # ===================================================================== Kafka ==
    def _kafka_marker(self) -> tuple[str, ...]:
        return ("kafka.Kafka", str(self.paths.kafka / "server.properties"))

    def _up_kafka(self) -> None:
        if self._alive("kafka", self._kafka_marker()):
            self.report("kafka already running, reusing it")
            return
        java_rt = self._java()
        self._require_free(self.s.kafka_port, "Kafka broker", "STORMLINE_KAFKA_PORT")
        self._require_free(
            self.s.kafka_controller_port, "KRaft controller", "STORMLINE_KAFKA_CONTROLLER_PORT"
        )
        jars = self._resolve_jars()
        log_dir = self.paths.kafka / "data"
        config = self._write_kafka_config(log_dir)
        log4j = self._write_log4j()
        java = [
            java_rt.path,
            *_quiet_jdk_flags(java_rt),
            f"-Xmx{self.s.kafka_heap}",
            "-XX:+UseG1GC",
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp",
            jars.kafka_classpath,
        ]
        self._check_kafka_data(log_dir)
        if not (log_dir / "meta.properties").exists():
            self.report(f"formatting Kafka storage in {log_dir}")
            cluster_id = _cluster_id()
            fmt = subprocess.run(
                [*java, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config)],
                capture_output=True,
                text=True,
            )
            if fmt.returncode != 0:
                raise StackError(
                    f"Formatting Kafka storage in {log_dir} failed:\n"
                    f"{(fmt.stdout + fmt.stderr).strip()[-2000:]}"
                )
        self.report(
            f"starting Kafka {jars.kafka_version} on 127.0.0.1:{self.s.kafka_port} "
            f"(Java {java_rt.major} from {java_rt.origin})"
        )
        proc = process.start_daemon(
            [*java, "kafka.Kafka", str(config)],
            pidfile=self.paths.pidfile("kafka"),
            logfile=self.paths.logfile("kafka"),
        )
        self._wait(
            "kafka",
            proc,
            self._kafka_answers,
            timeout=90,
            hint=f"Kafka's data is in {log_dir}; it was not touched.",
        )

    def _write_kafka_config(self, log_dir: Path) -> Path:
        self.paths.kafka.mkdir(parents=True, exist_ok=True)
        port, cport = self.s.kafka_port, self.s.kafka_controller_port
        lines = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{cport}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(log_dir),
            # One node: every internal topic has a single replica.
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            # Tests and the demo start many short-lived groups: do not wait for joiners.
            "group.initial.rebalance.delay.ms": "0",
            # Topics come from the catalog, with their partition counts and retention.
            "auto.create.topics.enable": "false",
            "num.partitions": "3",
        }
        path = self.paths.kafka / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
        return path

    def _write_log4j(self) -> Path:
        path = self.paths.kafka / "log4j2.properties"
        path.write_text(
            "status = warn\n"
            "appender.out.type = Console\n"
            "appender.out.name = OUT\n"
            "appender.out.layout.type = PatternLayout\n"
            "appender.out.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = INFO\n"
            "rootLogger.appenderRef.out.ref = OUT\n"
            "logger.state.name = state.change.logger\n"
            "logger.state.level = WARN\n"
        )
        return path

    def _check_kafka_data(self, log_dir: Path) -> None:
        """Refuse to start on a data directory that is not a formatted Kafka log dir."""
        meta = log_dir / "meta.properties"
        corrupt = f"The Kafka data directory {log_dir} looks corrupt"
        advice = (
            "Stormline did not change or delete it. Move it aside (or restore it) and run "
            "`stormline up` again, or set STORMLINE_DATA_DIR to a new directory."
        )
        if meta.exists():
            text = meta.read_text(errors="replace")
            if not re.search(r"^cluster\.id=\S+", text, re.M) or not re.search(
                r"^node\.id=1\s*$", text, re.M
            ):
                raise StackError(f"{corrupt}: {meta} has no valid cluster.id/node.id. {advice}")
        elif log_dir.exists() and any(log_dir.iterdir()):
            raise StackError(f"{corrupt}: it holds files but no meta.properties. {advice}")

    def _kafka_answers(self) -> bool:
        from stormline.runtime.admin import admin_client

        admin = admin_client(self.s, logger=_QUIET, **{"socket.timeout.ms": 2000})
        try:
            md = admin.list_topics(timeout=2)
        except Exception:
            return False
        return bool(md.brokers)

    def _kafka_status(self) -> ServiceStatus:
        managed = self.s.kafka_bootstrap_servers is None
        st = ServiceStatus("kafka", self.s.bootstrap_servers, False, managed=managed)
        if managed:
            st.pid = self._alive("kafka", self._kafka_marker())
            st.running = st.pid is not None
            if not st.running:
                st.detail = "not running (stormline up starts it)"
                return st
        try:
            st.healthy = self._kafka_answers()
            host, port = self.s.bootstrap_servers.split(",")[0].rsplit(":", 1)
            level = metadata_version_level(host, int(port), timeout=3)
            if level is not None:
                st.version = release_of_metadata_level(level)
                st.detail = f"metadata.version level {level}"
        except Exception as exc:
            st.detail = f"no answer: {exc}"
            st.healthy = False
        if not st.healthy and not st.detail:
            st.detail = "does not answer a metadata request"
        return st

    # ===================================================================== registry ==
    def _registry_marker(self) -> tuple[str, ...]:
        # "apicurio-registry" is in the path of the jar it runs (the cache folder is
        # apicurio-registry-<version>), for the 3.3 fast-jar and the older runner jar alike.
        return ("apicurio-registry", f"-Dquarkus.http.port={self.s.registry_port}")

    def _up_registry(self) -> None:
        if self._alive("registry", self._registry_marker()):
            self.report("schema registry already running, reusing it")
            return
        java_rt = self._java()
        self._require_free(self.s.registry_port, "schema registry", "STORMLINE_REGISTRY_PORT")
        jars = self._resolve_jars()
        self.report(
            f"starting Apicurio Registry {jars.apicurio_version} on "
            f"127.0.0.1:{self.s.registry_port} (storage: Kafka topic kafkasql-journal; "
            f"Java {java_rt.major} from {java_rt.origin})"
        )
        argv = [
            java_rt.path,
            *_quiet_jdk_flags(java_rt),
            "-Xmx384m",
            "-XX:TieredStopAtLevel=1",
            f"-Dquarkus.http.port={self.s.registry_port}",
            "-Dquarkus.http.host=127.0.0.1",
            # Apicurio 3.3 serves health and metrics on a second (management) interface,
            # 0.0.0.0:9000 by default: two stacks on one machine collide there, and it is open
            # to the network. It cannot be turned off at run time (quarkus.management.enabled
            # is fixed at build time), so it goes to loopback on a port the kernel picks.
            # Stormline's health check is GET /subjects on the main port.
            "-Dquarkus.management.host=127.0.0.1",
            "-Dquarkus.management.port=0",
            # Start-up reads the (empty) journal and snapshot topics, each until a poll comes
            # back empty: 5 s per poll by default, 1 s here.
            "-Dapicurio.kafkasql.consumer.poll.timeout=1000",
            '-Dquarkus.log.category."org.apache.kafka".level=WARN',
            # Schemas live in Kafka itself, so ids survive restarts and every process agrees.
            "-Dapicurio.storage.kind=kafkasql",
            f"-Dapicurio.kafkasql.bootstrap.servers={self.s.bootstrap_servers}",
            '-Dquarkus.log.category."io.apicurio".level=WARN',
            "-jar",
            str(jars.apicurio_jar),
        ]
        proc = process.start_daemon(
            argv,
            pidfile=self.paths.pidfile("registry"),
            logfile=self.paths.logfile("registry"),
            cwd=jars.apicurio_dir,
        )
        self._wait("registry", proc, self._registry_answers, timeout=120)

    def _registry_answers(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.s.registry_url}/subjects", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def _registry_status(self) -> ServiceStatus:
        import httpx

        managed = self.s.schema_registry_url is None
        st = ServiceStatus("schema-registry", self.s.registry_url, False, managed=managed)
        if managed:
            st.pid = self._alive("registry", self._registry_marker())
            st.running = st.pid is not None
            if not st.running:
                st.detail = "not running (stormline up starts it)"
                return st
        st.healthy = self._registry_answers()
        if not st.healthy:
            st.detail = "GET /subjects does not answer 200"
            return st
        base = self.s.registry_url.split("/apis/ccompat")[0]
        try:
            info = httpx.get(f"{base}/apis/registry/v3/system/info", timeout=2).json()
            st.version = f"Apicurio {info['version']}"
        except (httpx.HTTPError, ValueError, KeyError):
            st.version = "Confluent-compatible"
        return st

    # ===================================================================== Redis ==
    def _redis_marker(self) -> tuple[str, ...]:
        # redis-server rewrites its command line to "redis-server 127.0.0.1:PORT".
        return ("redis-server", f"127.0.0.1:{self.s.redis_port}")

    def _up_redis(self) -> None:
        if self._alive("redis", self._redis_marker()):
            self.report("redis already running, reusing it")
            return
        exe = shutil.which("redis-server")
        if exe is None:
            raise StackError(
                "redis-server is not installed. Install it: "
                "apt-get install -y redis-server (make demo/test do this)."
            )
        self._require_free(self.s.redis_port, "redis-server", "STORMLINE_REDIS_PORT")
        self.paths.redis.mkdir(parents=True, exist_ok=True)
        self.report(f"starting redis-server on 127.0.0.1:{self.s.redis_port}")
        proc = process.start_daemon(
            [
                exe,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.s.redis_port),
                "--dir",
                str(self.paths.redis),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
            ],
            pidfile=self.paths.pidfile("redis"),
            logfile=self.paths.logfile("redis"),
        )
        self._wait("redis", proc, self._redis_answers, timeout=20)

    def _redis_answers(self) -> bool:
        return self._redis_version() is not None

    def _redis_version(self) -> str | None:
        import redis

        try:
            client = redis.Redis.from_url(self.s.redis_address, socket_timeout=2)
            return str(client.info("server")["redis_version"])
        except redis.RedisError:
            return None

    def _redis_status(self) -> ServiceStatus:
        managed = self.s.redis_url is None
        st = ServiceStatus("redis", _redact_url(self.s.redis_address), False, managed=managed)
        if managed:
            st.pid = self._alive("redis", self._redis_marker())
            st.running = st.pid is not None
            if not st.running:
                st.detail = "not running (stormline up starts it)"
                return st
        version = self._redis_version()
        st.healthy, st.version = version is not None, version or ""
        st.detail = "" if st.healthy else "PING/INFO does not answer"
        return st

    # ===================================================================== ClickHouse ==
    def _clickhouse_status(self) -> ServiceStatus:
        if self.s.clickhouse_url:
            st = ServiceStatus(
                "clickhouse", _redact_url(self.s.clickhouse_url), False, managed=False
            )
            try:
                import clickhouse_connect

                client = clickhouse_connect.get_client(dsn=self.s.clickhouse_url, connect_timeout=3)
                st.version, st.healthy, st.running = client.server_version, True, True
            except Exception as exc:
                st.detail = f"no answer: {exc}"
            return st
        # chDB runs inside whichever process queries it and allows one process per data
        # path, so status checks the library and the directory without opening a session.
        import chdb

        path = self.s.chdb_path.resolve()
        st = ServiceStatus(
            "clickhouse", f"chdb://{path}", False, version=f"chDB {chdb.__version__}", running=True
        )
        existing = next(p for p in (path, *path.parents) if p.exists())
        st.healthy = existing.is_dir() and _writable(existing)
        if not st.healthy:
            st.detail = f"{existing} is not a writable directory"
        else:
            st.detail = "in-process" + ("" if existing == path else ", created on first use")
        return st

    # ===================================================================== helpers ==
    def _resolve_jars(self) -> Jars:
        if self._jars is None:
            self.report("resolving jars (fetched from Maven Central once, then cached)")
            self._jars = JarResolver.from_settings(self.s, report=self.report).resolve()
        return self._jars

    def _java(self) -> Java:
        """The Java 21+ that runs the broker and the registry (deploy/java.py says which)."""
        if self._java_rt is None:
            self._java_rt = find_java(self.s.java)
        return self._java_rt

    def _alive(self, name: str, marker: tuple[str, ...]) -> int | None:
        pid = process.running_pid(self.paths.pidfile(name), marker[0])
        return pid if pid is not None and self._owned(pid, marker) else None

    @staticmethod
    def _owned(pid: int, marker: tuple[str, ...]) -> bool:
        cmd = process.cmdline(pid)
        return all(m in cmd for m in marker)

    def _wait(
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
    def _require_free(port: int, what: str, setting: str) -> None:
        if not process.port_is_free(port):
            raise StackError(
                f"Port {port} on 127.0.0.1 is taken by another program, so the "
                f"embedded {what} cannot listen there. Stop that program or set "
                f"{setting} to a free port."
            )


def _quiet_jdk_flags(java: Java) -> list[str]:
    """Java 24+ warns at start-up about sun.misc.Unsafe and JNI use that Kafka's and Quarkus's
    libraries still make; allow both so the logs show only what matters."""
    flags = []
    if java.major >= 23:
        flags.append("--sun-misc-unsafe-memory-access=allow")
    if java.major >= 24:
        flags.append("--enable-native-access=ALL-UNNAMED")
    return flags


def _cluster_id() -> str:
    """A KRaft cluster id (base64url of a uuid) that Kafka's storage tool cannot mistake for an
    option: one starting with '-' (1 in 64) made `kafka-storage format -t` fail."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def _writable(path: Path) -> bool:
    probe = path / ".stormline-write-probe"
    try:
        probe.write_text("")
        probe.unlink()
        return True
    except OSError:
        return False


def _redact_url(url: str) -> str:
    """Drop any password from a URL before it is shown or logged."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)
