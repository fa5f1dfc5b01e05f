import json
import struct

import fastavro
import pytest

from schemas.codec import ALERT, AUDIO_CHUNK, DEAD_LETTER, FRAME_CHUNK, INFERENCE_RESULT, SCHEMA_DIR, Codec, SchemaError

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
    import io

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
        (b"{\"json\": true}", "magic byte"),
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
