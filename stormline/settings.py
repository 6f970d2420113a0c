"""The one settings object.

Every part reads its configuration from :class:`Settings`. Values come, in order of
precedence, from CLI flags (the CLI passes them as keyword arguments), ``STORMLINE_*``
environment variables, a ``.env`` file in the working directory, then the defaults below.

A service left unset (``kafka_bootstrap_servers``, ``schema_registry_url``, ``redis_url``,
``clickhouse_url``) means "use the embedded one": ``stormline up`` starts it on loopback.
Setting it points Stormline at an existing cluster and ``up`` leaves that service alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "stormline"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="STORMLINE_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    # -- where things live -------------------------------------------------------------
    data_dir: Path = Field(
        default=Path(".stormline"),
        description="Broker logs, Redis data, chDB files and checkpoints of the embedded stack.",
    )
    cache_dir: Path = Field(
        default=DEFAULT_CACHE_DIR,
        description="Downloads kept between runs: the Maven repository and unpacked jars.",
    )
    topic_prefix: str = Field(default="", description="Prepended to every topic name.")
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

    # -- Kafka --------------------------------------------------------------------------
    kafka_bootstrap_servers: str | None = Field(
        default=None, description="Existing cluster; unset means the embedded broker."
    )
    kafka_security_protocol: str | None = Field(default=None, description="e.g. SASL_SSL")
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_location: str | None = None
    kafka_port: int = Field(default=9092, description="Embedded broker's client port.")
    kafka_controller_port: int = Field(default=9093, description="Embedded KRaft controller port.")
    kafka_heap: str = Field(default="768m", description="Embedded broker's JVM heap.")

    # -- Schema registry ----------------------------------------------------------------
    schema_registry_url: str | None = Field(
        default=None,
        description="Confluent-compatible registry URL; unset means the embedded Apicurio.",
    )
    registry_port: int = Field(default=8081, description="Embedded registry's HTTP port.")

    # -- Redis, ClickHouse --------------------------------------------------------------
    redis_url: str | None = Field(default=None, description="unset means embedded redis-server")
    redis_port: int = Field(default=6379, description="Embedded redis-server's port.")
    clickhouse_url: str | None = Field(
        default=None,
        description="ClickHouse server (http://user:pass@host:8123/db); unset means chDB on disk.",
    )

    # -- workers, providers, evaluators (consumers/) -------------------------------------

    # -- router (streams/) ----------------------------------------------------------------

    # -- trainer (trainer/) ---------------------------------------------------------------

    # -- sink, analytics (consumers/sink*, analytics) -------------------------------------

    @field_validator("topic_prefix")
    @classmethod
    def _prefix_is_topic_safe(cls, v: str) -> str:
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        if not set(v) <= allowed:
            raise ValueError("topic_prefix may hold only letters, digits, '.', '_' and '-'")
        return v

    # -- derived ------------------------------------------------------------------------
    @property
    def bootstrap_servers(self) -> str:
        return self.kafka_bootstrap_servers or f"127.0.0.1:{self.kafka_port}"

    @property
    def registry_url(self) -> str:
        return self.schema_registry_url or f"http://127.0.0.1:{self.registry_port}/apis/ccompat/v7"

    @property
    def redis_address(self) -> str:
        return self.redis_url or f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def chdb_path(self) -> Path:
        return self.data_dir / "clickhouse"

    def kafka_client_config(self) -> dict[str, Any]:
        """librdkafka settings common to every client, SASL/SSL passed through."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers}
        if self.kafka_security_protocol:
            conf["security.protocol"] = self.kafka_security_protocol
        if self.kafka_sasl_mechanism:
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
        if self.kafka_sasl_username:
            conf["sasl.username"] = self.kafka_sasl_username
        if self.kafka_sasl_password:
            conf["sasl.password"] = self.kafka_sasl_password.get_secret_value()
        if self.kafka_ssl_ca_location:
            conf["ssl.ca.location"] = self.kafka_ssl_ca_location
        return conf

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"
