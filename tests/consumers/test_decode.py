import io
import threading

import numpy as np
import pytest
from PIL import Image

from consumers.decode import AudioDecoder, DecodedInput, DecodePool, FrameDecoder, InvalidInput, decode_threads
from engines.repository import ModelRepository, ModelSpec
from engines.settings import EngineSettings
from producers.synth import CameraScene
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


# -- JPEG through libjpeg-turbo (simplejpeg) ------------------------------------------------------------------------


def _jpeg_of(image: np.ndarray, quality: int = 90) -> bytes:
    """`image` (HxWx3, or HxW grayscale) as a JPEG, encoded as the device SDK encodes frames."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _scene_frame(seed: int = 0) -> np.ndarray:
    return CameraScene(np.random.default_rng(seed)).next_frame()[0]


def test_a_jpeg_decodes_to_its_source_within_jpeg_error(codec: Codec) -> None:
    decoder = FrameDecoder(REPOSITORY.resolve("frame_classifier"), codec)
    flat = decoder.decode(_frame(codec, encoding="JPEG", data=jpeg(224, 224))).item
    assert flat.shape == (224, 224, 3) and flat.dtype == np.uint8
    assert np.abs(flat.astype(int) - 90).max() <= 2
    source = _scene_frame()
    scene = decoder.decode(_frame(codec, encoding="JPEG", data=_jpeg_of(source))).item
    assert np.abs(scene.astype(int) - source).mean() < 2.5  # quality 90: about one level per pixel on average


def test_a_grayscale_jpeg_is_replicated_to_rgb(codec: Codec) -> None:
    gray = np.tile(np.linspace(0, 255, 224, dtype=np.uint8), (224, 1))
    value = _frame(codec, encoding="JPEG", channels=1, data=_jpeg_of(gray))
    item = FrameDecoder(REPOSITORY.resolve("frame_classifier"), codec).decode(value).item
    assert item.shape == (224, 224, 3)
    assert (item[:, :, 0] == item[:, :, 1]).all() and (item[:, :, 1] == item[:, :, 2]).all()
    assert np.abs(item[:, :, 0].astype(int) - gray).mean() < 2


@pytest.mark.parametrize(("height", "width"), [(720, 1280), (480, 640), (100, 300)])
def test_a_jpeg_of_another_size_is_resized_like_a_bilinear_resize_of_the_whole_frame(
    codec: Codec, height: int, width: int
) -> None:
    # A smooth picture: DCT scaling (1/2 and 1/4 here) and a bilinear resize of the full frame agree on it to
    # within JPEG's error; they differ only in how much fine detail each filters out.
    y, x = np.mgrid[0:height, 0:width]
    source = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=2).astype(np.uint8)
    expected = np.asarray(Image.fromarray(source).resize((224, 224), Image.BILINEAR))
    value = _frame(codec, encoding="JPEG", height=height, width=width, data=_jpeg_of(source))
    item = FrameDecoder(REPOSITORY.resolve("frame_classifier"), codec).decode(value).item
    assert item.shape == (224, 224, 3)
    assert np.abs(item.astype(int) - expected).mean() < 2


@pytest.mark.parametrize(
    ("data", "stage", "reason"),
    [
        (jpeg(64, 64)[:-200], "decode", "truncated"),
        (b"\xff\xd8\xff\xe0" + b"\x17" * 300 + b"\xff\xd9", "decode", "does not decode"),  # a JPEG start, then junk
        (b"GIF89a" + bytes(40) + b"\xff\xd9", "decode", "not JPEG"),
        (declaring(jpeg(16, 16), 5000, 4000), "validate", "over the limit"),
    ],
)
def test_bad_jpegs_keep_their_stage_and_reason(codec: Codec, data: bytes, stage: str, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason) as info:
        FrameDecoder(REPOSITORY.resolve("frame_classifier"), codec).decode(_frame(codec, encoding="JPEG", data=data))
    assert info.value.stage == stage


# -- the decode pool -------------------------------------------------------------------------------------------------


class _Exploding(FrameDecoder):
    """A frame decoder that fails unexpectedly (not with InvalidInput) on one payload, and records the threads
    it decoded on."""

    BOOM = b"boom"

    def __init__(self, spec: ModelSpec, codec: Codec) -> None:
        super().__init__(spec, codec)
        self.threads: set[int] = set()

    def decode_into(self, value: bytes | None, out: np.ndarray) -> DecodedInput:
        self.threads.add(threading.get_ident())
        if value == self.BOOM:
            raise RuntimeError("a bug, not a bad input")
        return super().decode_into(value, out)


def _mixed_batch(codec: Codec) -> tuple[list[bytes | None], dict[int, str]]:
    """Good frames of every kind between bad ones; returns the values, and the failing positions with the
    stage each fails at ("bug" for the unexpected exception)."""
    gray = np.full((224, 224), 77, np.uint8)
    values: list[bytes | None] = [
        _frame(codec, data=_scene_frame(1).tobytes()),
        None,
        _frame(codec, encoding="JPEG", data=_jpeg_of(_scene_frame(2))),
        _frame(codec, encoding="JPEG", data=jpeg(64, 64)[:-200]),
        _frame(codec, encoding="JPEG", height=480, width=640, data=_jpeg_of(np.zeros((480, 640, 3), np.uint8))),
        _Exploding.BOOM,
        _frame(codec, encoding="JPEG", channels=1, data=_jpeg_of(gray)),
        _frame(codec, dtype="float32"),
        _frame(codec, channels=1, data=gray.tobytes()),
    ]
    return values, {1: "decode", 3: "decode", 5: "bug", 7: "validate"}


@pytest.mark.parametrize("threads", [1, 3, 16])
async def test_the_pool_decodes_what_the_decoder_does_in_order_with_failures_in_place(
    codec: Codec, threads: int
) -> None:
    spec = REPOSITORY.resolve("frame_classifier")
    values, failing = _mixed_batch(codec)
    pool = DecodePool(_Exploding(spec, codec), threads)
    try:
        decoded = await pool.decode(values)
    finally:
        pool.close()
    good = [i for i in range(len(values)) if i not in failing]
    assert decoded.positions == good
    assert [position for position, _ in decoded.failures] == sorted(failing)
    for position, exc in decoded.failures:
        if failing[position] == "bug":
            assert isinstance(exc, RuntimeError) and not isinstance(exc, InvalidInput)
        else:
            assert isinstance(exc, InvalidInput) and exc.stage == failing[position]
    assert decoded.batch.shape == (len(good), 224, 224, 3) and decoded.batch.flags.c_contiguous
    single = FrameDecoder(spec, codec)
    for row, (position, item) in enumerate(zip(decoded.positions, decoded.inputs, strict=True)):
        expected = single.decode(values[position])
        assert item.record == expected.record
        np.testing.assert_array_equal(decoded.batch[row], expected.item)
        assert np.shares_memory(item.item, decoded.batch) and (item.item == decoded.batch[row]).all()


async def test_the_pool_decodes_off_the_event_loop_thread(codec: Codec) -> None:
    decoder = _Exploding(REPOSITORY.resolve("frame_classifier"), codec)
    pool = DecodePool(decoder, 2)
    try:
        decoded = await pool.decode([_frame(codec)] * 4)
    finally:
        pool.close()
    assert len(decoded.inputs) == 4
    assert decoder.threads and threading.get_ident() not in decoder.threads


async def test_the_pool_handles_empty_and_all_failed_batches(codec: Codec) -> None:
    pool = DecodePool(AudioDecoder(REPOSITORY.resolve("audio_classifier"), codec), 2)
    try:
        empty = await pool.decode([])
        failed = await pool.decode([None, b"\x00", _audio(codec, b"")])
        audio = await pool.decode([_audio(codec, np.arange(5000)), None, _audio(codec, np.full(10, 3))])
    finally:
        pool.close()
    assert empty.batch.shape == (0, 4000) and not empty.failures
    assert failed.batch.shape == (0, 4000) and [p for p, _ in failed.failures] == [0, 1, 2]
    assert audio.positions == [0, 2] and audio.batch.dtype == np.int16
    assert (audio.batch[0] == np.arange(4000)).all()
    assert (audio.batch[1, :10] == 3).all() and (audio.batch[1, 10:] == 0).all()  # padded: np.empty rows are not zeroed


def test_decode_threads_follow_the_setting_or_the_cores() -> None:
    assert decode_threads(3) == 3
    assert 1 <= decode_threads(None) <= 8
