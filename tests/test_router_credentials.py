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
