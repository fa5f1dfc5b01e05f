"""Typed records cross the wire unchanged, and the builders derive what downstream deduplicates on."""

import io
import json
import struct

import fastavro
import pytest

from schemas.codec import INFERENCE_RESULT, SCHEMA_DIR, Codec, SchemaError
from schemas.records import AudioChunk, InferenceResult, Source, alert_for, alert_id, dead_letter_for
from schemas.topics import AUDIO, FRAME, TopicSettings, modality
from tests.records import make_result


def test_a_result_round_trips_through_the_wire_format() -> None:
    codec = Codec()
    result = make_result(5, partition=3, score=0.75)  # exact in Avro's 32-bit floats
    value = codec.write(result)
    assert codec.decode(value)[0] == INFERENCE_RESULT
    assert codec.read(value, InferenceResult) == result
    assert result.source == Source("frames", 3, 5)


def test_reading_a_record_of_another_type_is_a_schema_error() -> None:
    codec = Codec()
    with pytest.raises(SchemaError, match="expected a io.sluice.AudioChunk"):
        codec.read(codec.write(make_result(1)), AudioChunk)


def test_alert_ids_follow_the_rule_and_the_source_not_the_time() -> None:
    result = make_result(9)
    first, again = alert_for("r", 60, result, "circle", 0.9), alert_for("r", 60, result, "circle", 0.95)
    assert first.alert_id == again.alert_id == alert_id("r", result.source)
    assert alert_for("other", 60, result, "circle", 0.9).alert_id != first.alert_id
    assert first.source == result.source


def test_a_dead_letter_keeps_the_original_bytes() -> None:
    letter = dead_letter_for(Source("t", 1, 2), b"k", b"raw", "decode", "SchemaError", "bad", "worker")
    assert (letter.key, letter.value, letter.source) == (b"k", b"raw", Source("t", 1, 2))
    assert Codec().read(Codec().write(letter), type(letter)) == letter


def test_the_modality_table_names_topics_symbols_and_records() -> None:
    topics = TopicSettings().prefixed("x")
    assert FRAME.input_topic(topics) == "x.sluice.frames" and AUDIO.input_topic(topics) == "x.sluice.audio"
    assert modality("frame") is FRAME and modality("AUDIO") is AUDIO
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        modality("video")


def test_a_result_carries_its_input_statistics_and_probabilities() -> None:
    codec = Codec()
    result = make_result(2, score=0.75)  # exact in Avro's 32-bit floats
    result.input_stats = {"brightness": 96.5, "contrast": 41.25}
    result.probabilities = [0.75, 0.125, 0.125]
    result.prediction_entropy = 0.75
    assert codec.read(codec.write(result), InferenceResult) == result


def test_a_version_1_result_still_decodes_with_empty_statistics() -> None:
    """Results written before version 2 (id 1003) stay readable: the new fields take their defaults."""
    v1 = fastavro.parse_schema(json.loads((SCHEMA_DIR / "inference_result.avsc").read_text()))
    old = make_result(4, score=0.75)
    avro = old.to_avro()
    for name in ("input_stats", "probabilities", "prediction_entropy", "embedding"):
        avro.pop(name)
    buf = io.BytesIO()
    buf.write(struct.pack(">bI", 0, 1003))
    fastavro.schemaless_writer(buf, v1, avro)
    decoded = Codec().read(buf.getvalue(), InferenceResult)
    assert decoded == old and decoded.input_stats == {} and decoded.probabilities == []
