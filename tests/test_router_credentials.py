"""The router's Faust app gets the same SASL/SSL settings as the confluent-kafka clients."""

from __future__ import annotations

import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from stormline.runtime.connection import broker_credentials
from stormline.settings import Settings


def _aiokafka(**kw: str) -> dict[str, object]:
    creds = broker_credentials(Settings(**kw))  # type: ignore[arg-type]
    return credentials_to_aiokafka_auth(creds) if creds else {"security_protocol": "PLAINTEXT"}


def test_plaintext_by_default() -> None:
    assert _aiokafka() == {"security_protocol": "PLAINTEXT"}


def test_sasl_ssl_passes_mechanism_user_password_and_tls() -> None:
    auth = _aiokafka(
        kafka_security_protocol="sasl_ssl",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="svc",
        kafka_sasl_password="s3cret",
    )
    assert auth["security_protocol"] == "SASL_SSL"
    assert auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == ("svc", "s3cret")
    assert auth["ssl_context"] is not None


def test_sasl_plaintext_has_no_tls_and_defaults_to_plain() -> None:
    auth = _aiokafka(kafka_security_protocol="SASL_PLAINTEXT", kafka_sasl_username="u")
    assert auth["security_protocol"] == "SASL_PLAINTEXT"
    assert auth["sasl_mechanism"] == "PLAIN"
    assert auth["ssl_context"] is None


def test_ssl_only() -> None:
    assert _aiokafka(kafka_security_protocol="SSL")["security_protocol"] == "SSL"


def test_unknown_protocol_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="STORMLINE_KAFKA_SECURITY_PROTOCOL"):
        broker_credentials(Settings(kafka_security_protocol="TLS"))


# ------------------------------------------------- finding 5: every router client --
def test_every_router_client_gets_the_same_security(tmp_path: object) -> None:
    """The Faust app (group consumer, producer), the group-less broadcast reader and the admin
    client that creates the internal topics: one security config, from one place.

    Before the runtime kernel the broadcast reader was built with the bootstrap servers only,
    so on a SASL cluster it read no heartbeats and no agent was ever a candidate.
    """
    from stormline.runtime.admin import admin_client
    from stormline.runtime.connection import confluent_config
    from stormline.streams.kafka import broadcast_config, faust_app

    s = Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_sasl_username="router",
        kafka_sasl_password="pw-xyz",
        data_dir=str(tmp_path),
    )
    app = faust_app(s, 4, 1)
    faust_auth = credentials_to_aiokafka_auth(app.conf.broker_credentials)
    reader = broadcast_config(s)
    fields = ("security_protocol", "sasl_mechanism", "sasl_plain_username", "sasl_plain_password")
    assert {f: reader[f] for f in fields} == {f: faust_auth[f] for f in fields}
    assert reader["sasl_plain_username"] == "router" and reader["ssl_context"] is not None
    assert reader["group_id"] is None  # every worker reads the broadcast topics in full
    conf = confluent_config(s)
    assert (conf["security.protocol"], conf["sasl.mechanism"]) == ("SASL_SSL", "SCRAM-SHA-256")
    assert (conf["sasl.username"], conf["sasl.password"]) == ("router", "pw-xyz")
    admin_client(s)  # the internal topics' admin is built from that same config
