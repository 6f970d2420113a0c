"""The embedded Kafka: a KRaft cluster of one node (the default) or several
(``stormline up --brokers 3``) on loopback, each node broker and controller with its own ports,
config and storage (formatted once, never touched when it looks wrong), and its status.

One node keeps the layout it always had (``kafka/server.properties``, ``kafka/data``,
``run/kafka.pid``); node ``i`` of a larger cluster lives in ``kafka/node-i`` (``run/kafka-i.pid``).
The number of nodes is fixed when the storage is formatted (KRaft's controller quorum is
static), so it is recorded in ``kafka/cluster.json``; ``status`` and ``down`` read it, and a
command that does not ask for a size explicitly follows it (:func:`follow_layout`).
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from stormline.deploy import process
from stormline.deploy.errors import StackError
from stormline.deploy.kafka_probe import metadata_version_level, release_of_metadata_level
from stormline.deploy.stack_base import ServiceStatus, StackContext, StackPaths, quiet_jdk_flags
from stormline.runtime.admin import replication_for
from stormline.settings import Settings

# librdkafka logs every refused connection while a broker starts; health checks want silence.
_QUIET = logging.getLogger("stormline.stack.librdkafka")
STATUS_PATIENCE_S = 10.0  # how long a live node may miss metadata requests in a status
_QUIET.setLevel(logging.CRITICAL)
_QUIET.propagate = False


@dataclass(frozen=True)
class KafkaNode:
    node_id: int
    port: int
    controller_port: int
    name: str  # the pid/log file name and the status row: "kafka", or "kafka-<i>" in a cluster
    home: Path  # server.properties, log4j2.properties and data/

    @property
    def config(self) -> Path:
        return self.home / "server.properties"

    @property
    def log_dir(self) -> Path:
        return self.home / "data"

    def marker(self) -> tuple[str, ...]:
        return ("kafka.Kafka", str(self.config))


def nodes_of(paths: StackPaths, settings: Settings) -> list[KafkaNode]:
    ports = settings.kafka_nodes()
    if len(ports) == 1:
        return [KafkaNode(1, *ports[0], "kafka", paths.kafka)]
    return [
        KafkaNode(i, port, cport, f"kafka-{i}", paths.kafka / f"node-{i}")
        for i, (port, cport) in enumerate(ports, start=1)
    ]


def recorded_layout(paths: StackPaths) -> dict[str, object] | None:
    """The cluster this data directory holds: {"brokers": n, "ports": [...], ...}, or None."""
    path = paths.kafka / "cluster.json"
    if path.exists():
        doc: dict[str, object] = json.loads(path.read_text())
        return doc
    if (paths.kafka / "data" / "meta.properties").exists():  # formatted before the record
        return {"brokers": 1}
    return None


def follow_layout(paths: StackPaths, settings: Settings) -> Settings:
    """``settings`` with the recorded cluster's size and ports, unless they ask for a size
    themselves (then :meth:`KafkaCluster.up` refuses a mismatch) or name an external cluster."""
    layout = recorded_layout(paths)
    if layout is None or settings.kafka_bootstrap_servers is not None:
        return settings
    if "kafka_brokers" in settings.model_fields_set:
        return settings
    update: dict[str, object] = {"kafka_brokers": layout["brokers"]}
    for key in ("kafka_port", "kafka_controller_port", "kafka_node_ports"):
        if key in layout and key not in settings.model_fields_set:
            update[key] = layout[key]
    if "kafka_node_controller_ports" in layout:
        update["kafka_node_controller_ports"] = layout["kafka_node_controller_ports"]
    return settings.model_copy(update=update)


class KafkaCluster:
    name = "kafka"

    def __init__(self, ctx: StackContext) -> None:
        self.ctx = ctx
        self.s = ctx.s
        self.paths = ctx.paths
        self.nodes = nodes_of(self.paths, self.s)

    def markers(self) -> list[tuple[str, tuple[str, ...]]]:
        """(pid file name, marker) of every node, for ``down``."""
        return [(n.name, n.marker()) for n in self.nodes]

    def up(self) -> None:
        ctx = self.ctx
        self._check_layout()
        started = []
        for node in self.nodes:
            if ctx.alive(node.name, node.marker()):
                ctx.report(f"{node.name} already running, reusing it")
            else:
                started.append((node, self._start(node)))
        self._record_layout()
        # A node of a larger cluster cannot answer before a quorum of controllers runs, so
        # every missing node is started first, then each is waited for.
        for node, proc in started:
            ctx.wait(
                node.name,
                proc,
                functools.partial(self.node_answers, node),
                timeout=90 + 30 * (len(started) - 1),
                hint=f"Kafka's data is in {node.log_dir}; it was not touched.",
            )

    def _start(self, node: KafkaNode) -> subprocess.Popen[bytes]:
        ctx = self.ctx
        java_rt = ctx.java()
        port_setting, cport_setting = _port_settings(node)
        ctx.require_free(node.port, "Kafka broker", port_setting)
        ctx.require_free(node.controller_port, "KRaft controller", cport_setting)
        jars = ctx.jars()
        self._write_config(node)
        java = [
            java_rt.path,
            *quiet_jdk_flags(java_rt),
            f"-Xmx{self.s.kafka_heap}",
            "-XX:+UseG1GC",
            f"-Dlog4j2.configurationFile={self._write_log4j(node)}",
            "-cp",
            jars.kafka_classpath,
        ]
        self._check_data(node)
        if not (node.log_dir / "meta.properties").exists():
            self._format(java, node)
        where = "" if len(self.nodes) == 1 else f" (node {node.node_id} of {len(self.nodes)})"
        ctx.report(
            f"starting Kafka {jars.kafka_version} on 127.0.0.1:{node.port}{where} "
            f"(Java {java_rt.major} from {java_rt.origin})"
        )
        return process.start_daemon(
            [*java, "kafka.Kafka", str(node.config)],
            pidfile=self.paths.pidfile(node.name),
            logfile=self.paths.logfile(node.name),
        )

    # ------------------------------------------------------------------ layout --
    def _check_layout(self) -> None:
        layout = recorded_layout(self.paths)
        if layout is None or layout["brokers"] == len(self.nodes):
            return
        have = layout["brokers"]
        raise StackError(
            f"The data directory {self.paths.root} holds a {have}-node Kafka cluster, and "
            f"{len(self.nodes)} nodes were asked for: KRaft fixes its controllers when the "
            f"storage is formatted, so Stormline did not touch it. Run `stormline up "
            f"--brokers {have}` (STORMLINE_KAFKA_BROKERS={have}), or set STORMLINE_DATA_DIR "
            "to a new directory."
        )

    def _record_layout(self) -> None:
        s = self.s
        doc = {
            "brokers": len(self.nodes),
            "kafka_port": s.kafka_port,
            "kafka_controller_port": s.kafka_controller_port,
            "kafka_node_ports": [n.port for n in self.nodes[1:]],
            "kafka_node_controller_ports": [n.controller_port for n in self.nodes[1:]],
        }
        path = self.paths.kafka / "cluster.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1) + "\n")

    # ------------------------------------------------------------------ storage --
    def _cluster_id(self) -> str:
        """The id every node is formatted with: an existing node's, else a new one."""
        for node in self.nodes:
            meta = node.log_dir / "meta.properties"
            if meta.exists():
                found = re.search(r"^cluster\.id=(\S+)", meta.read_text(errors="replace"), re.M)
                if found:
                    return found.group(1)
        return new_cluster_id()

    def _format(self, java: list[str], node: KafkaNode) -> None:
        self.ctx.report(f"formatting Kafka storage in {node.log_dir}")
        fmt = subprocess.run(
            [
                *java,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                self._cluster_id(),
                "-c",
                str(node.config),
            ],
            capture_output=True,
            text=True,
        )
        if fmt.returncode != 0:
            raise StackError(
                f"Formatting Kafka storage in {node.log_dir} failed:\n"
                f"{(fmt.stdout + fmt.stderr).strip()[-2000:]}"
            )

    def _write_config(self, node: KafkaNode) -> Path:
        node.home.mkdir(parents=True, exist_ok=True)
        n = len(self.nodes)
        voters = ",".join(f"{x.node_id}@127.0.0.1:{x.controller_port}" for x in self.nodes)
        rep = replication_for(self.s, n)
        internal = str(min(3, n))  # the broker's own topics: as replicated as the cluster allows
        internal_isr = "2" if n >= 3 else "1"
        lines = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{node.port},"
            f"CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(node.log_dir),
            "offsets.topic.replication.factor": internal,
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": internal,
            "transaction.state.log.min.isr": internal_isr,
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": internal,
            "share.coordinator.state.topic.min.isr": internal_isr,
            # A topic created without explicit settings (by a tool, or a client library's own
            # default) is replicated like Stormline's.
            "default.replication.factor": str(rep.factor),
            "min.insync.replicas": str(rep.min_insync),
            # A replica that missed writes never becomes leader: acknowledged writes stay.
            "unclean.leader.election.enable": "false",
            # Tests and the demo start many short-lived groups: do not wait for joiners.
            "group.initial.rebalance.delay.ms": "0",
            # Topics come from the catalog, with their partition counts and retention.
            "auto.create.topics.enable": "false",
            "num.partitions": "3",
        }
        node.config.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
        return node.config

    def _write_log4j(self, node: KafkaNode) -> Path:
        path = node.home / "log4j2.properties"
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

    def _check_data(self, node: KafkaNode) -> None:
        """Refuse to start on a data directory that is not a formatted Kafka log dir."""
        meta = node.log_dir / "meta.properties"
        corrupt = f"The Kafka data directory {node.log_dir} looks corrupt"
        advice = (
            "Stormline did not change or delete it. Move it aside (or restore it) and run "
            "`stormline up` again, or set STORMLINE_DATA_DIR to a new directory."
        )
        if meta.exists():
            text = meta.read_text(errors="replace")
            if not re.search(r"^cluster\.id=\S+", text, re.M) or not re.search(
                rf"^node\.id={node.node_id}\s*$", text, re.M
            ):
                raise StackError(f"{corrupt}: {meta} has no valid cluster.id/node.id. {advice}")
        elif node.log_dir.exists() and any(node.log_dir.iterdir()):
            raise StackError(f"{corrupt}: it holds files but no meta.properties. {advice}")

    # ------------------------------------------------------------------ health --
    def node_answers(self, node: KafkaNode) -> bool:
        """The node answers a metadata request on its own port and counts itself a broker of
        the cluster (it has joined, not just opened its socket)."""
        from stormline.runtime.admin import admin_client

        own = self.s.model_copy(update={"kafka_bootstrap_servers": f"127.0.0.1:{node.port}"})
        admin = admin_client(own, logger=_QUIET, **{"socket.timeout.ms": 2000})
        try:
            md = admin.list_topics(timeout=2)
        except Exception:
            return False
        return node.node_id in md.brokers

    def _answers_within(self, node: KafkaNode, patience_s: float) -> bool:
        """node_answers, asked again for ``patience_s``: a node that just joined (or whose
        peer was just killed) can miss one 2-second metadata request while it is alive and
        well, and ``stormline up`` must not call it down for that (seen in the three-broker
        chaos test: `up` waited for kafka-3, then its status check missed once)."""
        deadline = time.monotonic() + patience_s
        while not self.node_answers(node):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)
        return True

    def answers(self) -> bool:
        return all(self.node_answers(n) for n in self.nodes)

    def status(self) -> list[ServiceStatus]:
        managed = self.s.kafka_bootstrap_servers is None
        if not managed:
            return [self._external_status()]
        return [self._node_status(n) for n in self.nodes]

    def _node_status(self, node: KafkaNode) -> ServiceStatus:
        st = ServiceStatus(node.name, f"127.0.0.1:{node.port}", False)
        if not self.ctx.managed_status(st, node.name, node.marker()):
            return st
        st.healthy = self._answers_within(node, STATUS_PATIENCE_S)
        self._version(st, "127.0.0.1", node.port)
        if not st.healthy and not st.detail:
            st.detail = "does not answer a metadata request"
        elif len(self.nodes) > 1:
            st.detail = f"node {node.node_id} of {len(self.nodes)}; {st.detail}".rstrip("; ")
        return st

    def _external_status(self) -> ServiceStatus:
        from stormline.runtime.admin import admin_client

        st = ServiceStatus("kafka", self.s.bootstrap_servers, False, managed=False)
        try:
            st.healthy = bool(admin_client(self.s, logger=_QUIET).list_topics(timeout=5).brokers)
            host, port = self.s.bootstrap_servers.split(",")[0].rsplit(":", 1)
            self._version(st, host, int(port))
        except Exception as exc:
            st.detail = f"no answer: {exc}"
            st.healthy = False
        return st

    @staticmethod
    def _version(st: ServiceStatus, host: str, port: int) -> None:
        try:
            level = metadata_version_level(host, port, timeout=3)
        except Exception as exc:
            st.detail = f"no answer: {exc}"
            st.healthy = False
            return
        if level is not None:
            st.version = release_of_metadata_level(level)
            st.detail = f"metadata.version level {level}"


def _port_settings(node: KafkaNode) -> tuple[str, str]:
    """The settings that move ``node``'s client and controller ports."""
    if node.node_id == 1:
        return "STORMLINE_KAFKA_PORT", "STORMLINE_KAFKA_CONTROLLER_PORT"
    i = node.node_id - 2
    return f"STORMLINE_KAFKA_NODE_PORTS[{i}]", f"STORMLINE_KAFKA_NODE_CONTROLLER_PORTS[{i}]"


def new_cluster_id() -> str:
    """A KRaft cluster id (base64url of a uuid) that Kafka's storage tool cannot mistake for an
    option: one starting with '-' (1 in 64) made `kafka-storage format -t` fail."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid
