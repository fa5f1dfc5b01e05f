import io

import numpy as np
import pytest
from PIL import Image

from consumers.decode import AudioDecoder, FrameDecoder, InvalidInput
from engines.repository import ModelRepository
from engines.settings import EngineSettings
from schemas.codec import Codec
from schemas.records import AudioChunk, FrameChunk
from tests.records import declaring, jpeg

REPOSITORY = ModelRepository(EngineSettings().model_repository)


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


def _frame(codec: Codec, **overrides: object) -> bytes:
    record = FrameChunk(
        device_id="cam", trace_id="t", seq=0, capture_time_us=0, encoding="RAW",
        height=224, width=224, channels=3, dtype="uint8", data=bytes(224 * 224 * 3),
    )  # fmt: skip
    for name, value in overrides.items():
        setattr(record, name, value)
    return codec.write(record)


def _audio(codec: Codec, pcm: np.ndarray | bytes, sample_rate: int = 16_000, channels: int = 1) -> bytes:
    data = pcm if isinstance(pcm, bytes) else pcm.astype("<i2").tobytes()
    record = AudioChunk(
        device_id="mic", trace_id="t", seq=0, capture_time_us=0, encoding="PCM_S16LE",
        sample_rate=sample_rate, channels=channels, data=data,
    )  # fmt: skip
    return codec.write(record)


def test_raw_frame_decodes_to_the_model_input(codec: Codec) -> None:
    decoded = FrameDecoder(REPOSITORY.resolve("frame_classifier"), codec).decode(_frame(codec))
    assert decoded.item.shape == (224, 224, 3) and decoded.item.dtype == np.uint8
    assert decoded.record.data == b"", "the payload is not kept beside the decoded item"


def test_jpeg_and_other_resolutions_are_served(codec: Codec) -> None:
    image = np.full((120, 160, 3), 200, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG")
    value = _frame(codec, encoding="JPEG", height=120, width=160, data=buf.getvalue())
    decoded = FrameDecoder(REPOSITORY.resolve("frame_classifier"), codec).decode(value)
    assert decoded.item.shape == (224, 224, 3)
    assert abs(int(decoded.item.mean()) - 200) <= 3


def test_grayscale_frames_are_replicated_to_rgb(codec: Codec) -> None:
    value = _frame(codec, channels=1, data=bytes(224 * 224))
    assert FrameDecoder(REPOSITORY.resolve("frame_classifier"), codec).decode(value).item.shape == (224, 224, 3)


@pytest.mark.parametrize(
    ("overrides", "stage", "reason"),
    [
        ({"data": b"\x00" * 10}, "validate", "wrong shape"),
        ({"channels": 4, "data": bytes(224 * 224 * 4)}, "validate", "1 or 3 channels"),
        ({"dtype": "float32"}, "validate", "must be uint8"),
        ({"encoding": "JPEG", "data": b"not a jpeg"}, "decode", "JPEG payload"),
    ],
)
def test_unusable_frames_raise_with_a_reason(codec: Codec, overrides: dict, stage: str, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason) as info:
        FrameDecoder(REPOSITORY.resolve("frame_classifier"), codec).decode(_frame(codec, **overrides))
    assert info.value.stage == stage


def test_an_audio_record_on_the_frame_topic_is_a_decode_error(codec: Codec) -> None:
    with pytest.raises(InvalidInput, match="expected a io.sluice.FrameChunk") as info:
        FrameDecoder(REPOSITORY.resolve("frame_classifier"), codec).decode(_audio(codec, np.zeros(4000, np.int16)))
    assert info.value.stage == "decode"


def test_audio_is_downmixed_and_padded(codec: Codec) -> None:
    stereo = np.stack([np.full(3000, 1000), np.full(3000, 3000)], axis=1)
    decoded = AudioDecoder(REPOSITORY.resolve("audio_classifier"), codec).decode(_audio(codec, stereo, channels=2))
    assert decoded.item.shape == (4000,) and decoded.item.dtype == np.int16
    assert (decoded.item[:3000] == 2000).all() and (decoded.item[3000:] == 0).all()


def test_long_audio_is_cropped(codec: Codec) -> None:
    decoded = AudioDecoder(REPOSITORY.resolve("audio_classifier"), codec).decode(_audio(codec, np.arange(5000)))
    assert (decoded.item == np.arange(4000)).all()


@pytest.mark.parametrize(
    ("sample_rate", "channels", "data", "reason"),
    [
        (44_100, 1, bytes(8000), "expects 16000 Hz"),
        (16_000, 2, bytes(6), "whole number"),  # three int16 samples cannot be two channels
        (16_000, 1, bytes(7), "whole number"),
        (16_000, 1, b"", "empty"),
        (16_000, 0, bytes(8), "at least 1"),
    ],
)
def test_unusable_audio_raises_with_a_reason(
    codec: Codec, sample_rate: int, channels: int, data: bytes, reason: str
) -> None:
    value = _audio(codec, data, sample_rate=sample_rate, channels=channels)
    with pytest.raises(InvalidInput, match=reason):
        AudioDecoder(REPOSITORY.resolve("audio_classifier"), codec).decode(value)


@pytest.mark.parametrize(
    ("overrides", "stage", "reason"),
    [
        # 10000x10000 declared in a few hundred bytes: refused from the header, before any pixel is decoded.
        ({"encoding": "JPEG", "data": declaring(jpeg(16, 16), 10_000, 10_000)}, "validate", "over the limit"),
        ({"encoding": "JPEG", "data": jpeg(64, 64)[:-200]}, "decode", "truncated"),
        ({"height": 5000, "width": 5000, "data": b""}, "validate", "over the limit"),
        ({"height": -2, "width": 4, "data": b""}, "validate", "positive sides"),
        ({"device_id": "cam\n7"}, "validate", "device_id"),
        ({"device_id": "c" * 10_000}, "validate", "device_id"),
    ],
)
def test_hostile_frames_are_refused_before_they_cost_memory(
    codec: Codec, overrides: dict, stage: str, reason: str
) -> None:
    with pytest.raises(InvalidInput, match=reason) as info:
        FrameDecoder(REPOSITORY.resolve("frame_classifier"), codec).decode(_frame(codec, **overrides))
    assert info.value.stage == stage


def test_an_image_that_is_not_a_jpeg_is_a_decode_error(codec: Codec) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    png_that_ends_like_a_jpeg = buf.getvalue() + b"\xff\xd9"
    with pytest.raises(InvalidInput, match="not JPEG") as info:
        FrameDecoder(REPOSITORY.resolve("frame_classifier"), codec).decode(
            _frame(codec, encoding="JPEG", data=png_that_ends_like_a_jpeg)
        )
    assert info.value.stage == "decode"
