"""The one Kafka connection config: every client, confluent-kafka or aiokafka/Faust, from it.

:class:`KafkaConnection` is read once from the settings (bootstrap servers, security
protocol, SASL mechanism, user and password, CA file) and yields each client library's terms:

* :meth:`~KafkaConnection.confluent` - librdkafka properties (producers, consumers, admin);
* :meth:`~KafkaConnection.aiokafka` - keyword arguments of ``AIOKafkaConsumer`` /
  ``AIOKafkaProducer`` (the router's group-less reader);
* :meth:`~KafkaConnection.faust_credentials` - ``broker_credentials`` of a ``faust.App``,
  which Faust turns into exactly the :meth:`~KafkaConnection.aiokafka` arguments.

A SASL protocol with no mechanism set means PLAIN for every client (librdkafka alone would
default to GSSAPI, aiokafka/Faust to PLAIN: one cluster, two answers).
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from stormline.settings import Settings

if TYPE_CHECKING:
    from faust.types.auth import CredentialsT

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")


def client_logger() -> logging.Logger:
    """librdkafka's own log lines, routed through Python logging (ERROR and above by default)."""
    lg = logging.getLogger("stormline.librdkafka")
    if lg.level == logging.NOTSET:
        lg.setLevel(logging.ERROR)
    return lg


@dataclass(frozen=True)
class KafkaConnection:
    bootstrap_servers: str
    protocol: str = "PLAINTEXT"
    mechanism: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    ca_location: str | None = None

    @classmethod
    def from_settings(cls, s: Settings) -> KafkaConnection:
        protocol = (s.kafka_security_protocol or "PLAINTEXT").upper()
        if protocol not in PROTOCOLS:
            raise ValueError(
                f"STORMLINE_KAFKA_SECURITY_PROTOCOL={s.kafka_security_protocol!r} is not one of "
                + ", ".join(PROTOCOLS)
            )
        sasl = protocol.startswith("SASL_")
        return cls(
            bootstrap_servers=s.bootstrap_servers,
            protocol=protocol,
            mechanism=(s.kafka_sasl_mechanism or "PLAIN").upper() if sasl else None,
            username=s.kafka_sasl_username if sasl else None,
            password=s.kafka_sasl_password if sasl else None,
            ca_location=s.kafka_ssl_ca_location,
        )

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    def _password(self) -> str | None:
        return self.password.get_secret_value() if self.password is not None else None

    # ---------------------------------------------------------------- confluent-kafka --
    def confluent(self) -> dict[str, Any]:
        """librdkafka properties common to every confluent-kafka client."""
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers}
        if self.protocol != "PLAINTEXT":
            conf["security.protocol"] = self.protocol
        if self.sasl:
            conf["sasl.mechanism"] = self.mechanism
            if self.username is not None:
                conf["sasl.username"] = self.username
            if self.password is not None:
                conf["sasl.password"] = self._password()
        if self.tls and self.ca_location:
            conf["ssl.ca.location"] = self.ca_location
        return conf

    # ----------------------------------------------------------------- aiokafka/Faust --
    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=self.ca_location)

    def aiokafka(self) -> dict[str, Any]:
        """Keyword arguments of an aiokafka client (bootstrap servers and security)."""
        kw: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.protocol,
        }
        if self.tls or self.sasl:
            kw["ssl_context"] = self.ssl_context()
        if self.sasl:
            kw.update(
                sasl_mechanism=self.mechanism,
                sasl_plain_username=self.username,
                sasl_plain_password=self._password(),
            )
        return kw

    def faust_credentials(self) -> CredentialsT | None:
        """``faust.App(broker_credentials=...)``: the same security in Faust's terms."""
        import faust

        if self.protocol == "PLAINTEXT":
            return None
        if self.protocol == "SSL":
            return faust.SSLCredentials(self.ssl_context())
        return faust.SASLCredentials(
            username=self.username,
            password=self._password(),
            mechanism=self.mechanism,
            ssl_context=self.ssl_context(),
        )


def confluent_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """librdkafka properties from ``settings``, with a client's own ``overrides`` on top."""
    return {**KafkaConnection.from_settings(settings).confluent(), **overrides}


def broker_credentials(settings: Settings) -> CredentialsT | None:
    """The SASL/SSL settings that confluent-kafka clients get, in Faust's (aiokafka's) terms."""
    return KafkaConnection.from_settings(settings).faust_credentials()
