"""The embedded stack: a real Kafka broker (KRaft), an Apicurio registry, redis-server, chDB.

``up`` starts what is not running and reuses what is; ``down`` stops only what ``up``
started (pid file plus command-line marker); ``status`` reports each service's version,
address and health. A service whose address is set in :class:`Settings` is external: it is
checked, never started or stopped.

Data lives under ``settings.data_dir``; downloads under ``settings.cache_dir``. Nothing here
ever deletes data: a data directory that looks wrong stops ``up`` with a message instead.

This module is the facade (and starts the supervisor of Stormline's own services); each
service starts and reports itself: Kafka in ``stack_kafka.py``, the registry, Redis and chDB in
``stack_servers.py``, on what ``stack_base.py`` gives them all (paths, Java and jars, pid files).
"""

from __future__ import annotations

import json
import sys

from stormline.deploy import process
from stormline.deploy.stack_base import Report, ServiceStatus, StackContext, StackPaths
from stormline.deploy.stack_kafka import KafkaCluster, follow_layout, new_cluster_id
from stormline.deploy.stack_servers import ApicurioRegistry, RedisServer, clickhouse_status
from stormline.settings import Settings

__all__ = ["EmbeddedStack", "ServiceStatus"]

# tests/test_stack_ids.py checks the ids from here, where the stack always took them.
_cluster_id = new_cluster_id


class EmbeddedStack:
    def __init__(self, settings: Settings, report: Report | None = None) -> None:
        # A data directory that holds a cluster of several nodes is reported and stopped as
        # that cluster whatever size the settings default to (stack_kafka.follow_layout).
        settings = follow_layout(StackPaths(settings.data_dir.resolve()), settings)
        self.ctx = StackContext(settings, report)
        self.s = settings
        self.paths = self.ctx.paths
        self.report = self.ctx.report
        self.kafka = KafkaCluster(self.ctx)
        self.registry = ApicurioRegistry(self.ctx)
        self.redis = RedisServer(self.ctx)

    def up(self) -> list[ServiceStatus]:
        if self.s.kafka_bootstrap_servers is None:
            self.kafka.up()
        if self.s.schema_registry_url is None:
            self.registry.up()
        if self.s.redis_url is None:
            self.redis.up()
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.s.chdb_path.mkdir(parents=True, exist_ok=True)
        return self.status()

    def down(self) -> list[str]:
        stopped = []
        for name, marker in (
            ("supervisor", self._supervisor_marker()),
            ("registry", self.registry.marker()),
            ("redis", self.redis.marker()),
            *self.kafka.markers(),
        ):
            pid = process.running_pid(self.paths.pidfile(name), marker[0])
            if pid is not None and self.ctx.owned(pid, marker):
                self.report(f"stopping {name} (pid {pid})")
                process.stop_pid(pid, marker[0], timeout=60)
                stopped.append(name)
            self.paths.pidfile(name).unlink(missing_ok=True)
        return stopped

    def status(self) -> list[ServiceStatus]:
        return [
            *self.kafka.status(),
            self.registry.status(),
            self.redis.status(),
            clickhouse_status(self.s),
        ]

    # ------------------------------------------------------------- Stormline services --
    def _supervisor_marker(self) -> tuple[str, ...]:
        return ("stormline.deploy.supervisor", f"--data-dir {self.paths.root}")

    def up_services(self, workers: int = 2, simulator: bool = True, trainer: bool = True) -> int:
        """Start the supervisor of router, workers, evaluator, sink, trainer (and simulator)."""
        from stormline.schemas.kafka import ensure_topics
        from stormline.schemas.serde import Serde

        pid = self.ctx.alive("supervisor", self._supervisor_marker())
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
        if self.ctx.alive("supervisor", self._supervisor_marker()) is None or not state.exists():
            return []
        rows: list[dict[str, object]] = json.loads(state.read_text())
        for row in rows:
            pid = row.get("pid")
            row["running"] = isinstance(pid, int) and bool(process.cmdline(pid))
        return rows
