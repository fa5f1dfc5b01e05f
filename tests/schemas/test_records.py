"""Typed records cross the wire unchanged, and the builders derive what downstream deduplicates on."""

import pytest

from schemas.codec import INFERENCE_RESULT, Codec, SchemaError
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
