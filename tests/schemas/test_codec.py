import io
import json
import struct
from collections.abc import Iterator

import fastavro
import pytest

from schemas.codec import (
    ALERT,
    AUDIO_CHUNK,
    DEAD_LETTER,
    FRAME_CHUNK,
    INFERENCE_RESULT,
    SCHEMA_DIR,
    Codec,
    SchemaError,
    pinned_schemas,
)
from schemas.records import DeadLetter, Source, dead_letter_for
from schemas.registry import SchemaRegistry, SchemaRegistrySettings, codec_for
from tests.schemas.registry_double import RegistryDouble

FRAME = {
    "device_id": "cam-1", "trace_id": "abc", "seq": 3, "capture_time_us": 1_700_000_000_000_000,
    "encoding": "RAW", "height": 2, "width": 2, "channels": 3, "dtype": "uint8", "data": bytes(range(12)),
    "label": "circle",
}  # fmt: skip


def test_round_trip_uses_the_confluent_wire_format() -> None:
    codec = Codec()
    value = codec.encode(FRAME_CHUNK, FRAME)
    magic, schema_id = struct.unpack(">bI", value[:5])
    assert magic == 0 and schema_id == codec.schema_id(FRAME_CHUNK) == 1001
    assert codec.decode(value) == (FRAME_CHUNK, FRAME)


def test_any_avro_reader_with_the_avsc_decodes_the_body() -> None:
    """The pinned ids + .avsc files are all a foreign consumer needs."""
    registry = json.loads((SCHEMA_DIR / "registry.json").read_text())["schemas"]
    value = Codec().encode(FRAME_CHUNK, FRAME)
    schema_id = struct.unpack(">I", value[1:5])[0]
    schema = fastavro.parse_schema(json.loads((SCHEMA_DIR / registry[str(schema_id)]["file"]).read_text()))
    assert fastavro.schemaless_reader(io.BytesIO(value[5:]), schema) == FRAME


def test_every_registered_schema_has_a_distinct_id() -> None:
    codec = Codec()
    ids = [codec.schema_id(name) for name in (FRAME_CHUNK, AUDIO_CHUNK, INFERENCE_RESULT, ALERT, DEAD_LETTER)]
    assert len(set(ids)) == 5


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "tombstone"),
        (b"\x00\x00", "shorter than the 5-byte"),
        (b'{"json": true}', "magic byte"),
        (b"\x00\x00\x00\x00\x07abc", "unknown schema id 7"),
    ],
)
def test_bad_framing_is_a_clear_schema_error(value: bytes | None, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        Codec().decode(value)


def test_truncated_and_padded_bodies_are_rejected() -> None:
    codec = Codec()
    value = codec.encode(FRAME_CHUNK, FRAME)
    with pytest.raises(SchemaError, match="does not decode"):
        codec.decode(value[:-5])
    with pytest.raises(SchemaError, match="trailing bytes"):
        codec.decode(value + b"\x00")


def test_a_record_of_another_type_is_rejected_when_a_type_is_expected() -> None:
    codec = Codec()
    with pytest.raises(SchemaError, match="expected a io.sluice.AudioChunk"):
        codec.decode(codec.encode(FRAME_CHUNK, FRAME), expect=AUDIO_CHUNK)


def test_encoding_a_record_that_does_not_match_fails_before_sending() -> None:
    with pytest.raises(SchemaError, match="does not match"):
        Codec().encode(FRAME_CHUNK, {**FRAME, "height": "tall"})


def test_without_a_registry_the_topic_changes_nothing() -> None:
    codec = Codec()
    assert codec.encode(FRAME_CHUNK, FRAME, topic="anything") == codec.encode(FRAME_CHUNK, FRAME)


def test_pinned_schemas_list_each_record_s_versions_oldest_first() -> None:
    dead_letters = [p for p in pinned_schemas() if p.name == DEAD_LETTER]
    assert [(p.schema_id, p.path.name) for p in dead_letters] == [
        (1005, "dead_letter.avsc"),
        (1006, "dead_letter_v2.avsc"),
    ]
    assert Codec().schema_id(DEAD_LETTER) == 1006


# -- with a schema registry (the registry-protocol double of tests/schemas/registry_double.py) ------------------


@pytest.fixture
def registry() -> Iterator[RegistryDouble]:
    with RegistryDouble() as double:
        yield double


def _codec(registry: RegistryDouble, **settings: object) -> Codec:
    return codec_for(SchemaRegistrySettings(url=registry.url, **settings))  # type: ignore[arg-type]


def _framed(schema_id: int, schema: object, record: dict) -> bytes:
    buf = io.BytesIO()
    buf.write(struct.pack(">bI", 0, schema_id))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    return buf.getvalue()


def test_a_writer_uses_the_id_the_registry_assigned_under_the_topic_s_subject(registry: RegistryDouble) -> None:
    value = _codec(registry).encode(FRAME_CHUNK, FRAME, topic="sluice.frames")
    schema_id = struct.unpack(">I", value[1:5])[0]
    assert schema_id == registry.schema_id((SCHEMA_DIR / "frame_chunk.avsc").read_text()) == 1  # not the pinned 1001
    assert registry.subject_ids("sluice.frames-value") == [1]


def test_a_subject_is_registered_once_then_cached(registry: RegistryDouble) -> None:
    codec = _codec(registry)
    codec.encode(FRAME_CHUNK, FRAME, topic="sluice.frames")
    asked = len(registry.requests)
    for _ in range(100):
        codec.encode(FRAME_CHUNK, FRAME, topic="sluice.frames")
    assert len(registry.requests) == asked == 1
    # its own output reads back without asking either
    assert codec.decode(codec.encode(FRAME_CHUNK, FRAME, topic="sluice.frames")) == (FRAME_CHUNK, FRAME)
    assert len(registry.requests) == 1
    # another topic is another subject (TopicNameStrategy): one more registration, same schema, same id
    other = codec.encode(FRAME_CHUNK, FRAME, topic="lab.frames")
    assert registry.requests[-1] == ("POST", "/subjects/lab.frames-value/versions") and other[1:5] == b"\0\0\0\x01"


def test_with_a_registry_a_writer_must_say_where_the_record_goes(registry: RegistryDouble) -> None:
    with pytest.raises(SchemaError, match="needs the topic it goes to"):
        _codec(registry).encode(FRAME_CHUNK, FRAME)
    record_named = _codec(registry, subject_name_strategy="RecordNameStrategy")
    record_named.encode(FRAME_CHUNK, FRAME)  # one subject per record: no topic needed
    assert registry.subject_ids(FRAME_CHUNK) == [1]


def test_an_id_not_seen_before_is_fetched_once(registry: RegistryDouble) -> None:
    value = _codec(registry).encode(FRAME_CHUNK, FRAME, topic="sluice.frames")
    reader = _codec(registry)
    before = len(registry.requests)
    for _ in range(100):
        assert reader.decode(value, expect=FRAME_CHUNK) == (FRAME_CHUNK, FRAME)
    assert registry.requests[before:] == [("GET", "/schemas/ids/1")]


def test_an_id_the_registry_does_not_have_is_a_schema_error_naming_it(registry: RegistryDouble) -> None:
    reader = _codec(registry)
    for _ in range(3):
        with pytest.raises(
            SchemaError, match=r"unknown schema id 7: the schema registry at http://127\.0\.0\.1:\d+ has no"
        ):
            reader.decode(b"\x00\x00\x00\x00\x07abc")
    assert registry.requests == [("GET", "/schemas/ids/7")]  # asked once: poison does not hammer the registry


def test_a_record_written_with_a_pinned_id_still_decodes(registry: RegistryDouble) -> None:
    """Records on a topic from before the registry was configured drain normally."""
    assert _codec(registry).decode(Codec().encode(FRAME_CHUNK, FRAME)) == (FRAME_CHUNK, FRAME)


def test_an_older_writer_schema_resolves_to_the_newest_record(registry: RegistryDouble) -> None:
    v1 = (SCHEMA_DIR / "dead_letter.avsc").read_text()
    letter = dead_letter_for(Source("sluice.frames", 1, 2), b"k", b"v", "decode", "SchemaError", "bad", "worker")
    avro = letter.to_avro()
    del avro["headers"]  # version 1 has none
    schema_id = SchemaRegistry(SchemaRegistrySettings(url=registry.url)).register("old-value", v1)
    decoded = _codec(registry).read(_framed(schema_id, json.loads(v1), avro), DeadLetter)
    assert decoded == letter and decoded.headers == []


def test_a_newer_compatible_writer_schema_resolves_too(registry: RegistryDouble) -> None:
    """A producer a version ahead (a field Sluice does not know yet, with a default) still decodes."""
    v3 = json.loads((SCHEMA_DIR / "dead_letter_v2.avsc").read_text())
    v3["fields"].append({"name": "attempts", "type": "int", "default": 0})
    letter = dead_letter_for(Source("sluice.frames", 1, 2), None, b"v", "decode", "SchemaError", "bad", "worker")
    schema_id = SchemaRegistry(SchemaRegistrySettings(url=registry.url)).register("new-value", json.dumps(v3))
    value = _framed(schema_id, v3, {**letter.to_avro(), "attempts": 3})
    assert _codec(registry).read(value, DeadLetter) == letter


def test_a_writer_schema_that_does_not_resolve_is_a_schema_error(registry: RegistryDouble) -> None:
    changed = json.loads((SCHEMA_DIR / "dead_letter_v2.avsc").read_text())
    changed["fields"] = [f for f in changed["fields"] if f["name"] != "stage"]  # a field Sluice needs, gone
    registry.global_compatibility = "NONE"
    schema_id = SchemaRegistry(SchemaRegistrySettings(url=registry.url)).register("other-value", json.dumps(changed))
    letter = dead_letter_for(Source("t", 0, 0), None, None, "decode", "E", "r", "c").to_avro()
    del letter["stage"]
    with pytest.raises(SchemaError, match=f"schema id {schema_id} does not resolve to Sluice's io.sluice.DeadLetter"):
        _codec(registry).read(_framed(schema_id, changed, letter), DeadLetter)


def test_a_record_of_another_type_under_a_registry_id_is_rejected(registry: RegistryDouble) -> None:
    value = _codec(registry).encode(FRAME_CHUNK, FRAME, topic="sluice.frames")
    with pytest.raises(
        SchemaError, match=r"expected a io\.sluice\.AudioChunk, got a io\.sluice\.FrameChunk \(schema id 1\)"
    ):
        _codec(registry).decode(value, expect=AUDIO_CHUNK)
