"""nvJPEG batch decode agrees with the CPU decoder (within JPEG's error), resizes like it, and fails per input
as it does. Runs where torch sees a CUDA GPU and nvImageCodec is installed; elsewhere only the check that
the decoder says what is missing."""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from consumers.decode import FrameDecoder, InvalidInput
from consumers.gpu_decode import GpuFrameDecoder
from engines.base import EngineUnavailable
from engines.repository import ModelRepository
from engines.settings import EngineSettings
from producers.synth import CameraScene
from schemas.codec import Codec
from schemas.records import FrameChunk
from tests.records import declaring, jpeg

REPOSITORY = ModelRepository(EngineSettings().model_repository)


def _missing_for_gpu_decode() -> str | None:
    """What this host lacks to decode on the GPU, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU (a CPU-only build, or no driver)"
    try:
        found = importlib.util.find_spec("nvidia.nvimgcodec") is not None
    except ModuleNotFoundError:  # no `nvidia` namespace package at all
        found = False
    return None if found else "nvImageCodec is not installed (pip install 'sluice[gpu-decode]')"


MISSING = _missing_for_gpu_decode()
needs_gpu_decode = pytest.mark.skipif(MISSING is not None, reason=f"GPU decode cannot run here: {MISSING}")


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


@pytest.fixture(scope="module")
def gpu_decoder(codec: Codec) -> Iterator[GpuFrameDecoder]:
    decoder = GpuFrameDecoder(REPOSITORY.resolve("frame_classifier"), codec)
    yield decoder
    decoder.close()


def _frame(codec: Codec, image: np.ndarray | None = None, **overrides: object) -> bytes:
    """A frame record: `image` as a quality-90 JPEG (the device SDK's default), or RAW zeros."""
    record = FrameChunk(
        device_id="cam", trace_id="t", seq=0, capture_time_us=0, encoding="RAW",
        height=224, width=224, channels=3, dtype="uint8", data=bytes(224 * 224 * 3),
    )  # fmt: skip
    if image is not None:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=90)
        record.encoding, record.data = "JPEG", buf.getvalue()
        record.height, record.width = image.shape[:2]
        record.channels = 1 if image.ndim == 2 else 3
    for name, value in overrides.items():
        setattr(record, name, value)
    return codec.write(record)


def _cpu(codec: Codec, value: bytes | None) -> np.ndarray:
    return FrameDecoder(REPOSITORY.resolve("frame_classifier"), codec).decode(value).item


def _gradient(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=2).astype(np.uint8)


@pytest.mark.skipif(MISSING is None, reason="this host decodes on the GPU")
def test_without_a_gpu_or_the_package_the_decoder_says_what_is_missing(codec: Codec) -> None:
    with pytest.raises(EngineUnavailable, match=r"sluice\[gpu-decode\]|sees no CUDA GPU"):
        GpuFrameDecoder(REPOSITORY.resolve("frame_classifier"), codec)


def test_only_frame_models_are_decoded_on_the_gpu(codec: Codec) -> None:
    with pytest.raises(ValueError, match="no uint8 RGB frames"):
        GpuFrameDecoder(REPOSITORY.resolve("audio_classifier"), codec)


@needs_gpu_decode
def test_a_batch_decodes_on_the_gpu_as_on_the_cpu(codec: Codec, gpu_decoder: GpuFrameDecoder) -> None:
    values = [_frame(codec, CameraScene(np.random.default_rng(seed)).next_frame()[0]) for seed in range(6)]
    values.append(_frame(codec, np.full((224, 224), 77, np.uint8)))  # grayscale: replicated to RGB
    decoded = gpu_decoder.decode(values)
    assert decoded.positions == list(range(len(values))) and not decoded.failures
    assert decoded.batch.is_cuda and str(decoded.batch.dtype) == "torch.uint8" and decoded.batch.is_contiguous()
    assert tuple(decoded.batch.shape) == (7, 224, 224, 3)
    on_gpu = decoded.batch.cpu().numpy()
    for row, value in enumerate(values):
        # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by about a level per pixel.
        assert np.abs(on_gpu[row].astype(int) - _cpu(codec, value)).mean() < 2
    assert (on_gpu[6] == on_gpu[6, :, :, :1]).all()


@needs_gpu_decode
def test_frames_of_other_sizes_are_resized_on_the_gpu_like_the_cpu_resizes_them(
    codec: Codec, gpu_decoder: GpuFrameDecoder
) -> None:
    values = [_frame(codec, _gradient(h, w)) for h, w in ((720, 1280), (480, 640), (480, 640), (100, 300))]
    decoded = gpu_decoder.decode(values)
    assert decoded.positions == [0, 1, 2, 3] and tuple(decoded.batch.shape) == (4, 224, 224, 3)
    on_gpu = decoded.batch.cpu().numpy()
    for row, value in enumerate(values):
        assert np.abs(on_gpu[row].astype(int) - _cpu(codec, value)).mean() < 2.5


@needs_gpu_decode
def test_bad_payloads_fail_alone_with_the_cpu_decoders_stage(codec: Codec, gpu_decoder: GpuFrameDecoder) -> None:
    good = _frame(codec, CameraScene(np.random.default_rng(0)).next_frame()[0])
    # A JPEG's headers, then junk where its entropy-coded data should be: past the host's checks, so nvJPEG sees it.
    whole = jpeg(64, 64)
    scan = whole.index(b"\xff\xda")
    junk_scan = whole[: scan + 14] + bytes(range(256)) * 4 + b"\xff\xd9"
    values = [
        good,
        _frame(codec, encoding="JPEG", data=whole[:-200]),  # truncated
        _frame(codec, encoding="JPEG", data=declaring(jpeg(16, 16), 10_000, 10_000)),  # a bomb
        None,
        _frame(codec, data=np.full(224 * 224 * 3, 9, np.uint8).tobytes()),  # RAW: decoded on the host
        _frame(codec, encoding="JPEG", height=64, width=64, data=junk_scan),
        good,
    ]
    decoded = gpu_decoder.decode(values)
    failures = dict(decoded.failures)
    assert sorted(failures) == [p for p, _ in decoded.failures]
    for position, value in enumerate(values):
        # The junk scan is whatever each decoder makes of it (libjpeg recovers, as PIL did): what matters is
        # that the GPU path fails an input exactly when the CPU decoder does, at the same stage.
        try:
            _cpu(codec, value)
        except InvalidInput as exc:
            assert isinstance(failures[position], InvalidInput) and failures[position].stage == exc.stage
        else:
            assert position in decoded.positions
    assert {1, 2, 3} <= failures.keys()
    on_gpu = decoded.batch.cpu().numpy()
    for position in (0, 4, 6):
        expected = _cpu(codec, values[position])
        assert np.abs(on_gpu[decoded.positions.index(position)].astype(int) - expected).mean() < 2
