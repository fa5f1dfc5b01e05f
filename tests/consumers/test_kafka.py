"""Every process builds its Kafka clients from the same settings: aiokafka options, the device SDK,
and the Faust notifier's broker credentials alike."""

from pathlib import Path

import faust
from pydantic import SecretStr

from consumers.kafka import KafkaSettings, device_client, faust_broker_options
from consumers.settings import RedisSettings
from streams.apps.notifier import create_app
from streams.apps.settings import NotifierSettings

SASL = KafkaSettings(
    bootstrap_servers="kafka-1:9093,kafka-2:9093",
    security_protocol="SASL_SSL",
    sasl_mechanism="SCRAM-SHA-512",
    sasl_username="sluice",
    sasl_password=SecretStr("s3cret"),
)


def test_faust_credentials_come_from_the_sasl_settings() -> None:
    options = faust_broker_options(SASL, role="notifier")
    credentials = options["broker_credentials"]
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.username, credentials.password) == ("sluice", "s3cret")
    assert credentials.mechanism.value == "SCRAM-SHA-512"
    assert credentials.protocol.value == "SASL_SSL" and credentials.ssl_context is not None
    assert options["broker"] == ["kafka://kafka-1:9093", "kafka://kafka-2:9093"]


def test_faust_gets_plain_tls_or_nothing_when_sasl_is_off() -> None:
    tls = faust_broker_options(KafkaSettings(security_protocol="SSL"), role="notifier")["broker_credentials"]
    assert isinstance(tls, faust.SSLCredentials)
    assert faust_broker_options(KafkaSettings(), role="notifier")["broker_credentials"] is None


def test_the_notifier_app_connects_with_those_credentials(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rules]]\nname = "x"\nlabels = ["circle"]\nmin_score = 0.5\ncooldown_s = 1\n')
    app = create_app(SASL, NotifierSettings(rules_path=rules), RedisSettings())
    credentials = app.conf.broker_credentials
    assert isinstance(credentials, faust.SASLCredentials) and credentials.username == "sluice"
    assert app.conf.broker_client_id == "sluice-notifier"
    assert app.conf.broker_session_timeout == SASL.session_timeout_ms / 1000


async def test_aiokafka_clients_and_the_device_sdk_get_the_same_security_options() -> None:
    options = SASL.consumer_options()
    assert options["security_protocol"] == "SASL_SSL" and options["sasl_plain_password"] == "s3cret"
    assert options["enable_auto_commit"] is False
    producer = device_client(SASL)._producer
    assert producer.client._security_protocol == "SASL_SSL"
    assert producer.client._sasl_mechanism == "SCRAM-SHA-512"
