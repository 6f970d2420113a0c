"""The embedded stack's other services: the Apicurio schema registry (on the Java and jars
Kafka uses, storing schemas in Kafka), redis-server, and chDB's status (it runs in-process, so
there is nothing to start)."""

from __future__ import annotations

import shutil
from pathlib import Path

from stormline.deploy import process
from stormline.deploy.errors import StackError
from stormline.deploy.stack_base import ServiceStatus, StackContext, quiet_jdk_flags
from stormline.logs import redact_url
from stormline.settings import Settings


class ApicurioRegistry:
    name = "registry"

    def __init__(self, ctx: StackContext) -> None:
        self.ctx = ctx
        self.s = ctx.s

    def marker(self) -> tuple[str, ...]:
        # "apicurio-registry" is in the path of the jar it runs (the cache folder is
        # apicurio-registry-<version>), for the 3.3 fast-jar and the older runner jar alike.
        return ("apicurio-registry", f"-Dquarkus.http.port={self.s.registry_port}")

    def up(self) -> None:
        ctx = self.ctx
        if ctx.alive("registry", self.marker()):
            ctx.report("schema registry already running, reusing it")
            return
        java_rt = ctx.java()
        ctx.require_free(self.s.registry_port, "schema registry", "STORMLINE_REGISTRY_PORT")
        jars = ctx.jars()
        ctx.report(
            f"starting Apicurio Registry {jars.apicurio_version} on "
            f"127.0.0.1:{self.s.registry_port} (storage: Kafka topic kafkasql-journal; "
            f"Java {java_rt.major} from {java_rt.origin})"
        )
        argv = [
            java_rt.path,
            *quiet_jdk_flags(java_rt),
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
            # The journal (and the snapshots and events topics, which inherit its properties)
            # is replicated like every other topic: the schemas survive a lost broker.
            *self._journal_flags(),
            '-Dquarkus.log.category."io.apicurio".level=WARN',
            "-jar",
            str(jars.apicurio_jar),
        ]
        proc = process.start_daemon(
            argv,
            pidfile=ctx.paths.pidfile("registry"),
            logfile=ctx.paths.logfile("registry"),
            cwd=jars.apicurio_dir,
        )
        ctx.wait("registry", proc, self.answers, timeout=120)

    def _journal_flags(self) -> list[str]:
        from stormline.runtime.admin import replication, replication_for

        s = self.s
        rep = (
            replication_for(s, s.kafka_brokers)
            if s.kafka_bootstrap_servers is None
            else replication(s, timeout=15)
        )
        # Apicurio 3.3 hands its own "replication.factor" property on to Kafka as a topic
        # config (refused: "Unknown topic config name"), so the factor is the broker's
        # default.replication.factor, which the embedded cluster sets to the same value.
        return [f"-Dapicurio.kafkasql.topic.min.insync.replicas={rep.min_insync}"]

    def answers(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.s.registry_url}/subjects", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def status(self) -> ServiceStatus:
        import httpx

        managed = self.s.schema_registry_url is None
        st = ServiceStatus("schema-registry", self.s.registry_url, False, managed=managed)
        if managed and not self.ctx.managed_status(st, "registry", self.marker()):
            return st
        st.healthy = self.answers()
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


class RedisServer:
    name = "redis"

    def __init__(self, ctx: StackContext) -> None:
        self.ctx = ctx
        self.s = ctx.s

    def marker(self) -> tuple[str, ...]:
        # redis-server rewrites its command line to "redis-server 127.0.0.1:PORT".
        return ("redis-server", f"127.0.0.1:{self.s.redis_port}")

    def up(self) -> None:
        ctx = self.ctx
        if ctx.alive("redis", self.marker()):
            ctx.report("redis already running, reusing it")
            return
        exe = shutil.which("redis-server")
        if exe is None:
            raise StackError(
                "redis-server is not installed. Install it: "
                "apt-get install -y redis-server (make demo/test do this)."
            )
        ctx.require_free(self.s.redis_port, "redis-server", "STORMLINE_REDIS_PORT")
        ctx.paths.redis.mkdir(parents=True, exist_ok=True)
        ctx.report(f"starting redis-server on 127.0.0.1:{self.s.redis_port}")
        proc = process.start_daemon(
            [
                exe,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.s.redis_port),
                "--dir",
                str(ctx.paths.redis),
                "--appendonly",
                "yes",
                "--save",
                "",
                # Bounded: without a limit, idempotency records grow with traffic until the
                # machine runs out; full, the policy drops the oldest (every key has a TTL).
                "--maxmemory",
                self.s.redis_maxmemory,
                "--maxmemory-policy",
                self.s.redis_maxmemory_policy,
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
            ],
            pidfile=ctx.paths.pidfile("redis"),
            logfile=ctx.paths.logfile("redis"),
        )
        ctx.wait("redis", proc, self.answers, timeout=20)

    def answers(self) -> bool:
        return self.version() is not None

    def version(self) -> str | None:
        import redis

        try:
            client = redis.Redis.from_url(self.s.redis_address, socket_timeout=2)
            return str(client.info("server")["redis_version"])
        except redis.RedisError:
            return None

    def status(self) -> ServiceStatus:
        managed = self.s.redis_url is None
        st = ServiceStatus("redis", redact_url(self.s.redis_address), False, managed=managed)
        if managed and not self.ctx.managed_status(st, "redis", self.marker()):
            return st
        version = self.version()
        st.healthy, st.version = version is not None, version or ""
        st.detail = "" if st.healthy else "PING/INFO does not answer"
        return st


def clickhouse_status(s: Settings) -> ServiceStatus:
    if s.clickhouse_url:
        st = ServiceStatus("clickhouse", redact_url(s.clickhouse_url), False, managed=False)
        try:
            import clickhouse_connect

            client = clickhouse_connect.get_client(dsn=s.clickhouse_url, connect_timeout=3)
            # server_version is typed optional; a client that connected has read it.
            st.version, st.healthy, st.running = client.server_version or "", True, True
        except Exception as exc:
            st.detail = f"no answer: {exc}"
        return st
    # chDB runs inside whichever process queries it and allows one process per data
    # path, so status checks the library and the directory without opening a session.
    import chdb

    path = s.chdb_path.resolve()
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


def _writable(path: Path) -> bool:
    probe = path / ".stormline-write-probe"
    try:
        probe.write_text("")
        probe.unlink()
        return True
    except OSError:
        return False
