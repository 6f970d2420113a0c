"""The embedded Kafka broker: one KRaft node (broker and controller) on loopback, its config,
its storage (formatted once, never touched when it looks wrong), and its status."""

from __future__ import annotations

import base64
import logging
import re
import subprocess
import uuid
from pathlib import Path

from stormline.deploy import process
from stormline.deploy.errors import StackError
from stormline.deploy.kafka_probe import metadata_version_level, release_of_metadata_level
from stormline.deploy.stack_base import ServiceStatus, StackContext, quiet_jdk_flags

# librdkafka logs every refused connection while a broker starts; health checks want silence.
_QUIET = logging.getLogger("stormline.stack.librdkafka")
_QUIET.setLevel(logging.CRITICAL)
_QUIET.propagate = False


class KafkaBroker:
    name = "kafka"

    def __init__(self, ctx: StackContext) -> None:
        self.ctx = ctx
        self.s = ctx.s
        self.paths = ctx.paths

    def marker(self) -> tuple[str, ...]:
        return ("kafka.Kafka", str(self.paths.kafka / "server.properties"))

    def up(self) -> None:
        ctx = self.ctx
        if ctx.alive("kafka", self.marker()):
            ctx.report("kafka already running, reusing it")
            return
        java_rt = ctx.java()
        ctx.require_free(self.s.kafka_port, "Kafka broker", "STORMLINE_KAFKA_PORT")
        ctx.require_free(
            self.s.kafka_controller_port, "KRaft controller", "STORMLINE_KAFKA_CONTROLLER_PORT"
        )
        jars = ctx.jars()
        log_dir = self.paths.kafka / "data"
        config = self._write_config(log_dir)
        log4j = self._write_log4j()
        java = [
            java_rt.path,
            *quiet_jdk_flags(java_rt),
            f"-Xmx{self.s.kafka_heap}",
            "-XX:+UseG1GC",
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp",
            jars.kafka_classpath,
        ]
        self._check_data(log_dir)
        if not (log_dir / "meta.properties").exists():
            self._format(java, config, log_dir)
        ctx.report(
            f"starting Kafka {jars.kafka_version} on 127.0.0.1:{self.s.kafka_port} "
            f"(Java {java_rt.major} from {java_rt.origin})"
        )
        proc = process.start_daemon(
            [*java, "kafka.Kafka", str(config)],
            pidfile=self.paths.pidfile("kafka"),
            logfile=self.paths.logfile("kafka"),
        )
        ctx.wait(
            "kafka",
            proc,
            self.answers,
            timeout=90,
            hint=f"Kafka's data is in {log_dir}; it was not touched.",
        )

    def _format(self, java: list[str], config: Path, log_dir: Path) -> None:
        self.ctx.report(f"formatting Kafka storage in {log_dir}")
        cluster_id = new_cluster_id()
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

    def _write_config(self, log_dir: Path) -> Path:
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

    def _check_data(self, log_dir: Path) -> None:
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

    def answers(self) -> bool:
        from stormline.runtime.admin import admin_client

        admin = admin_client(self.s, logger=_QUIET, **{"socket.timeout.ms": 2000})
        try:
            md = admin.list_topics(timeout=2)
        except Exception:
            return False
        return bool(md.brokers)

    def status(self) -> ServiceStatus:
        managed = self.s.kafka_bootstrap_servers is None
        st = ServiceStatus("kafka", self.s.bootstrap_servers, False, managed=managed)
        if managed and not self.ctx.managed_status(st, "kafka", self.marker()):
            return st
        try:
            st.healthy = self.answers()
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


def new_cluster_id() -> str:
    """A KRaft cluster id (base64url of a uuid) that Kafka's storage tool cannot mistake for an
    option: one starting with '-' (1 in 64) made `kafka-storage format -t` fail."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid
