"""The schema registry path against the registry-protocol double (`registry_double.py`): settings, the
client's errors, `sluice schemas register`, and the round trip both ways with confluent-kafka's own
`AvroSerializer` and `AvroDeserializer`, which is what downstream services and foreign producers use."""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from pydantic import ValidationError
from rich.console import Console

from schemas.codec import DEAD_LETTER, FRAME_CHUNK, SCHEMA_DIR
from schemas.errors import ConfigError
from schemas.records import FrameChunk
from schemas.registry import (
    RegistryRefused,
    RegistryUnavailable,
    SchemaRegistry,
    SchemaRegistrySettings,
    codec_for,
    records_by_topic,
    register_schemas,
    subject_name,
)
from schemas.topics import TopicSettings
from streams import schemas_cli
from streams.settings import SluiceSettings, redacted
from tests.records import make_result
from tests.schemas.registry_double import RegistryDouble

FRAME = FrameChunk(
    device_id="cam-1", trace_id="t-1", seq=7, capture_time_us=1_700_000_000_000_000, encoding="RAW",
    height=2, width=2, channels=3, dtype="uint8", data=bytes(range(12)), label="circle",
)  # fmt: skip


@pytest.fixture
def registry() -> Iterator[RegistryDouble]:
    with RegistryDouble() as double:
        yield double


def _client(registry: RegistryDouble) -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": registry.url})


def _value(topic: str) -> SerializationContext:
    return SerializationContext(topic, MessageField.VALUE)


# -- settings ----------------------------------------------------------------------------------------------------


def test_settings_come_from_sluice_schema_registry_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICE_SCHEMA_REGISTRY__URL", "https://registry:8081")
    monkeypatch.setenv("SLUICE_SCHEMA_REGISTRY__SUBJECT_NAME_STRATEGY", "RecordNameStrategy")
    monkeypatch.setenv("SLUICE_SCHEMA_REGISTRY__BASIC_AUTH_USER", "sluice")
    monkeypatch.setenv("SLUICE_SCHEMA_REGISTRY__BASIC_AUTH_PASSWORD", "hunter2")
    settings = SluiceSettings()
    assert settings.schema_registry.url == "https://registry:8081"
    assert settings.schema_registry.subject_name_strategy == "RecordNameStrategy"
    assert settings.schema_registry.compatibility == "BACKWARD"
    assert "hunter2" not in json.dumps(redacted(settings))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"url": "registry:8081"}, "not an http:// or https:// URL"),
        ({"url": "http://a:8081, ftp://b"}, "'ftp://b' is not"),
        ({"url": "http://a:8081", "basic_auth_user": "u"}, "go together"),
        ({"compatibility": "SOMETIMES"}, "BACKWARD"),
    ],
)
def test_settings_that_cannot_work_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SchemaRegistrySettings(**settings)


def test_without_a_url_the_codec_writes_pinned_ids() -> None:
    for settings in (None, SchemaRegistrySettings()):
        assert codec_for(settings).schema_id(FRAME_CHUNK) == 1001


def test_subjects_follow_the_naming_strategy() -> None:
    assert subject_name("TopicNameStrategy", "sluice.frames", FRAME_CHUNK) == "sluice.frames-value"
    assert subject_name("RecordNameStrategy", None, FRAME_CHUNK) == "io.sluice.FrameChunk"
    assert subject_name("TopicRecordNameStrategy", "sluice.frames", FRAME_CHUNK) == "sluice.frames-io.sluice.FrameChunk"


def test_every_topic_names_the_record_it_carries() -> None:
    topics = TopicSettings()
    assert set(records_by_topic(topics)) == set(topics.names())


# -- the client's answers as Sluice's errors ---------------------------------------------------------------------


def test_an_unreachable_registry_is_unavailable_not_a_bad_record() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    codec = codec_for(SchemaRegistrySettings(url=url, timeout_s=0.5))
    with pytest.raises(RegistryUnavailable, match=f"schema registry at {url} did not answer fetching schema id 5"):
        codec.decode(b"\x00\x00\x00\x00\x05body")


def test_a_refused_registration_names_the_subject(registry: RegistryDouble) -> None:
    client = SchemaRegistry(SchemaRegistrySettings(url=registry.url))
    client.register("s-value", (SCHEMA_DIR / "dead_letter_v2.avsc").read_text())
    with pytest.raises(RegistryRefused, match="refused registering a schema under 's-value'.*incompatible"):
        client.register("s-value", (SCHEMA_DIR / "frame_chunk.avsc").read_text())


def test_writers_that_may_not_register_only_look_up(registry: RegistryDouble) -> None:
    codec = codec_for(SchemaRegistrySettings(url=registry.url, auto_register=False))
    with pytest.raises(RegistryRefused, match="run `sluice schemas register`"):
        codec.encode(FRAME_CHUNK, FRAME.to_avro(), topic="sluice.frames")
    register_schemas(SchemaRegistry(SchemaRegistrySettings(url=registry.url)), TopicSettings(), "BACKWARD")
    value = codec.encode(FRAME_CHUNK, FRAME.to_avro(), topic="sluice.frames")
    assert struct.unpack(">I", value[1:5])[0] == registry.subject_ids("sluice.frames-value")[-1]
    assert registry.requests[-1] == ("POST", "/subjects/sluice.frames-value")  # a lookup, not a registration


def test_credentials_go_in_the_authorization_header_never_in_urls(registry: RegistryDouble) -> None:
    for settings in (
        SchemaRegistrySettings(url=registry.url, basic_auth_user="sluice", basic_auth_password="hunter2"),
        SchemaRegistrySettings(url=registry.url.replace("http://", "http://sluice:hunter2@")),
    ):
        client = SchemaRegistry(settings)
        assert client.schema_text(1) is None
        assert registry.last_authorization == "Basic " + base64.b64encode(b"sluice:hunter2").decode()
        assert client.where == registry.url  # what errors show


def test_credentials_in_the_url_and_in_the_settings_are_a_config_error() -> None:
    settings = SchemaRegistrySettings(url="http://u:p@registry:8081", basic_auth_user="u", basic_auth_password="p")
    with pytest.raises(ConfigError, match="keep one"):
        SchemaRegistry(settings)


# -- the round trip with confluent-kafka's serializers -----------------------------------------------------------


def test_sluice_output_decodes_with_confluent_avro_deserializer(registry: RegistryDouble) -> None:
    result = make_result(3, score=0.75)  # exact in Avro's 32-bit floats
    value = codec_for(SchemaRegistrySettings(url=registry.url)).write(result, topic="sluice.results")
    decoded = AvroDeserializer(_client(registry))(value, _value("sluice.results"))
    assert decoded == result.to_avro()
    assert struct.unpack(">I", value[1:5])[0] == registry.subject_ids("sluice.results-value")[0] < 1000


def test_a_frame_from_confluent_avro_serializer_decodes_with_sluice_codec(registry: RegistryDouble) -> None:
    serializer = AvroSerializer(_client(registry), (SCHEMA_DIR / "frame_chunk.avsc").read_text())
    value = serializer(FRAME.to_avro(), _value("sluice.frames"))
    assert codec_for(SchemaRegistrySettings(url=registry.url)).read(value, FrameChunk) == FRAME
    assert registry.subject_ids("sluice.frames-value") == [struct.unpack(">I", value[1:5])[0]]


def test_sluice_and_confluent_writers_share_one_id_per_schema(registry: RegistryDouble) -> None:
    from_sluice = codec_for(SchemaRegistrySettings(url=registry.url)).write(FRAME, topic="sluice.frames")
    serializer = AvroSerializer(_client(registry), (SCHEMA_DIR / "frame_chunk.avsc").read_text())
    assert serializer(FRAME.to_avro(), _value("sluice.frames")) == from_sluice


# -- sluice schemas register -------------------------------------------------------------------------------------


def _register(settings: SluiceSettings, *argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    schemas_cli.add_arguments(parser)
    out = io.StringIO()
    status = schemas_cli.main(settings, parser.parse_args(["register", *argv]), Console(file=out, width=200))
    return status, out.getvalue()


def test_register_puts_every_version_under_each_topic_subject_and_prints_the_ids(registry: RegistryDouble) -> None:
    status, printed = _register(SluiceSettings(), "--registry", registry.url)
    assert status == 0
    topics = TopicSettings()
    for topic in records_by_topic(topics):
        subject = f"{topic}-value"
        ids = registry.subject_ids(subject)
        assert ids, f"{subject} was not registered"
        for schema_id in ids:
            assert any(subject in line and f" {schema_id} " in line for line in printed.splitlines()), printed
        assert registry.answer("GET", f"/config/{subject}", None) == {"compatibilityLevel": "BACKWARD"}
    v1, v2 = ((SCHEMA_DIR / name).read_text() for name in ("dead_letter.avsc", "dead_letter_v2.avsc"))
    assert registry.subject_ids(f"{topics.dead_letters}-value") == [registry.schema_id(v1), registry.schema_id(v2)]
    # results and shadow results carry the same record: the same ids, in the same order
    assert registry.subject_ids(f"{topics.results}-value") == registry.subject_ids(f"{topics.shadow_results}-value")
    assert len(registry.subject_ids(f"{topics.results}-value")) == 2


def test_register_again_registers_nothing_new(registry: RegistryDouble) -> None:
    _register(SluiceSettings(), "--registry", registry.url)
    before = {subject: registry.subject_ids(subject) for subject in registry.answer("GET", "/subjects", None)}
    status, printed = _register(SluiceSettings(), "--registry", registry.url, "--compatibility", "FULL")
    assert status == 0 and "already registered" in printed
    assert {subject: registry.subject_ids(subject) for subject in before} == before
    assert registry.answer("GET", "/config/sluice.frames-value", None) == {"compatibilityLevel": "FULL"}


def test_register_does_not_put_an_old_version_after_a_newer_one(registry: RegistryDouble) -> None:
    """A writer registered version 2 first: version 1 would become the subject's latest, so it is skipped."""
    codec_for(SchemaRegistrySettings(url=registry.url)).encode(DEAD_LETTER, {
        "source_topic": "t", "source_partition": 0, "source_offset": 0, "key": None, "value": None, "stage": "decode",
        "error_type": "E", "reason": "r", "component": "c", "failed_time_us": 0, "headers": [],
    }, topic="sluice.dead-letters")  # fmt: skip
    status, printed = _register(SluiceSettings(), "--registry", registry.url)
    assert status == 0 and "skipped: dead_letter_v2.avsc is registered already" in printed
    assert registry.subject_ids("sluice.dead-letters-value") == [
        registry.schema_id((SCHEMA_DIR / "dead_letter_v2.avsc").read_text())
    ]


def test_register_refuses_a_history_that_breaks_the_mode_before_asking_the_registry(
    registry: RegistryDouble, tmp_path: Path
) -> None:
    for file in SCHEMA_DIR.glob("*.avsc"):
        shutil.copy(file, tmp_path)
    shutil.copy(SCHEMA_DIR / "registry.json", tmp_path)
    broken = json.loads((tmp_path / "dead_letter_v2.avsc").read_text())
    broken["fields"].append({"name": "attempts", "type": "int"})
    (tmp_path / "dead_letter_v2.avsc").write_text(json.dumps(broken))
    client = SchemaRegistry(SchemaRegistrySettings(url=registry.url))
    with pytest.raises(RegistryRefused, match="dead_letter_v2.avsc is not BACKWARD compatible.*attempts: new field"):
        register_schemas(client, TopicSettings(), "BACKWARD", tmp_path)
    assert registry.requests == []


def test_register_needs_a_registry() -> None:
    with pytest.raises(ConfigError, match="pass --registry URL"):
        _register(SluiceSettings())
    with pytest.raises(ConfigError, match="not an http"):
        _register(SluiceSettings(), "--registry", "registry:8081")
