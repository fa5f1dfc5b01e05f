"""Input statistics: values checkable by hand, the vectorised batch against a per-item float64 reference,
and the simulator's drift (darker frames, added audio noise) moving them where the model's outputs do not."""

from __future__ import annotations

import numpy as np
import pytest

from consumers.input_stats import (
    CLIP_LEVEL,
    SILENCE_DBFS,
    AudioStats,
    FrameStats,
    audio_stats,
    frame_stats,
    input_stats,
    prediction_stats,
)
from engines.onnxruntime import OnnxRuntimeEngine
from engines.repository import ModelRepository
from engines.settings import EngineSettings
from producers.settings import SimulatorSettings
from producers.synth import SAMPLE_RATE, audio_dataset, frame_dataset

LUMA = np.array([0.299, 0.587, 0.114])
SIM = SimulatorSettings()  # the drift the simulator injects by default


def _tone(frequency: float, amplitude: float, samples: int = 4000, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(samples) / sample_rate
    return np.round(amplitude * 32767 * np.sin(2 * np.pi * frequency * t)).astype(np.int16)


# Frames


def test_a_constant_image_has_no_contrast_and_no_sharpness() -> None:
    rgb = (200, 100, 50)
    stats = frame_stats(np.full((2, 16, 20, 3), rgb, dtype=np.uint8))
    rg, yb = 200 - 100, (200 + 100) / 2 - 50
    assert stats.brightness == pytest.approx([LUMA @ rgb] * 2, abs=1e-3)
    assert stats.contrast == pytest.approx([0, 0], abs=1e-3)
    assert stats.sharpness == pytest.approx([0, 0], abs=1e-6)
    # Without spread, colourfulness is its mean term alone: 0.3 sqrt(mean(rg)² + mean(yb)²).
    assert stats.colourfulness == pytest.approx([0.3 * np.hypot(rg, yb)] * 2, rel=1e-5)


def test_a_grey_image_has_no_colourfulness() -> None:
    grey = np.random.default_rng(0).integers(0, 256, size=(3, 12, 12, 1), dtype=np.uint8).repeat(3, axis=3)
    assert frame_stats(grey).colourfulness == pytest.approx([0, 0, 0], abs=1e-4)


def test_a_checkerboard_has_the_sharpness_of_its_laplacian() -> None:
    # Every interior pixel's four neighbours hold the other value, so the Laplacian is ±4·255 with as
    # many of each sign on an even interior: its variance is 1020².
    board = ((np.indices((10, 10)).sum(axis=0) % 2) * 255).astype(np.uint8)
    stats = frame_stats(np.repeat(board[None, :, :, None], 3, axis=3))
    assert stats.sharpness == pytest.approx([1020.0**2], rel=1e-6)
    assert stats.brightness == pytest.approx([127.5], rel=1e-6)
    assert stats.contrast == pytest.approx([127.5], rel=1e-6)


def _frame_reference(image: np.ndarray) -> dict[str, float]:
    """One frame's statistics in float64, written straight from the formulas."""
    rgb = image.astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    luma = rgb @ LUMA
    rg, yb = r - g, (r + g) / 2 - b
    laplacian = luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4 * luma[1:-1, 1:-1]
    return {
        "brightness": luma.mean(),
        "contrast": luma.std(),
        "colourfulness": np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()),
        "sharpness": laplacian.var(),
    }


def test_frame_statistics_of_a_batch_equal_those_of_each_frame_alone() -> None:
    frames, _ = frame_dataset(6, np.random.default_rng(3))
    noisy = np.random.default_rng(4).integers(0, 256, size=(2, *frames.shape[1:]), dtype=np.uint8)
    batch = np.concatenate([frames, noisy])
    stats = frame_stats(batch)
    assert isinstance(stats, FrameStats) and len(stats) == len(batch)
    assert all(column.dtype == np.float32 for column in stats.columns().values())
    for index, image in enumerate(batch):
        assert stats.item(index) == pytest.approx(_frame_reference(image), rel=1e-4)


def test_frames_of_another_shape_or_type_are_refused() -> None:
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        frame_stats(np.zeros((2, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        frame_stats(np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="no interior pixel"):
        frame_stats(np.zeros((2, 2, 8, 3), dtype=np.uint8))


# Audio


@pytest.mark.parametrize("frequency", [250.0, 1000.0, 3500.0])
def test_a_sine_has_its_frequency_as_centroid_and_its_known_level(frequency: float) -> None:
    amplitude = 0.5
    stats = audio_stats(_tone(frequency, amplitude)[None], SAMPLE_RATE)
    assert stats.spectral_centroid_hz[0] == pytest.approx(frequency, rel=0.01)
    # RMS of a sine is its amplitude over √2: 20 log10(0.5 / √2) = -9.03 dBFS.
    assert stats.rms_dbfs[0] == pytest.approx(20 * np.log10(amplitude / np.sqrt(2)), abs=0.01)
    # Two crossings per period: 2 f / sample rate per sample.
    assert stats.zero_crossing_rate[0] == pytest.approx(2 * frequency / SAMPLE_RATE, abs=2 / 4000)
    assert stats.clipping_ratio[0] == 0.0


def test_a_full_scale_square_wave_is_all_clipped_at_0_dbfs() -> None:
    square = np.where(_tone(100.0, 1.0) >= 0, 32767, -32767).astype(np.int16)
    stats = audio_stats(square[None], SAMPLE_RATE)
    assert stats.clipping_ratio[0] == 1.0
    assert stats.rms_dbfs[0] == pytest.approx(0.0, abs=1e-3)


def test_clipping_counts_the_samples_at_the_documented_level() -> None:
    chunk = np.zeros(1000, dtype=np.int16)
    chunk[:10] = CLIP_LEVEL
    chunk[10:30] = -32768
    chunk[30:40] = CLIP_LEVEL - 1  # just under: not clipped
    assert audio_stats(chunk[None], SAMPLE_RATE).clipping_ratio[0] == pytest.approx(30 / 1000)


def test_silence_reads_the_floor_level_and_no_centroid() -> None:
    stats = audio_stats(np.zeros((2, 4000), dtype=np.int16), SAMPLE_RATE)
    assert stats.rms_dbfs == pytest.approx([SILENCE_DBFS] * 2, abs=1e-3)
    assert list(stats.spectral_centroid_hz) == [0.0, 0.0]
    assert list(stats.zero_crossing_rate) == [0.0, 0.0]


def _audio_reference(chunk: np.ndarray, sample_rate: int) -> dict[str, float]:
    """One chunk's statistics in float64, written straight from the formulas."""
    x = chunk.astype(np.float64) / 32768
    n = len(x)
    signs = x >= 0
    magnitude = np.abs(np.fft.rfft(x * (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n))))
    return {
        "rms_dbfs": 20 * np.log10(np.sqrt(np.mean(x * x))),
        "zero_crossing_rate": np.mean(signs[1:] != signs[:-1]),
        "spectral_centroid_hz": (np.fft.rfftfreq(n, 1 / sample_rate) @ magnitude) / magnitude.sum(),
        "clipping_ratio": np.mean(np.abs(chunk.astype(np.int32)) >= CLIP_LEVEL),
    }


def test_audio_statistics_of_a_batch_equal_those_of_each_chunk_alone() -> None:
    chunks, _ = audio_dataset(8, np.random.default_rng(5))
    loud = np.clip(np.random.default_rng(6).normal(0, 20000, size=(2, chunks.shape[1])), -32768, 32767)
    batch = np.concatenate([chunks, loud.astype(np.int16)])
    stats = audio_stats(batch, SAMPLE_RATE)
    assert isinstance(stats, AudioStats) and len(stats) == len(batch)
    assert all(column.dtype == np.float32 for column in stats.columns().values())
    assert stats.clipping_ratio[-1] > 0, "the loud chunks exercise clipping"
    for index, chunk in enumerate(batch):
        assert stats.item(index) == pytest.approx(_audio_reference(chunk, SAMPLE_RATE), rel=1e-4, abs=1e-6)


def test_audio_of_another_shape_or_type_is_refused() -> None:
    with pytest.raises(ValueError, match=r"int16 \[N, samples\]"):
        audio_stats(np.zeros((2, 4000), dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(ValueError, match="sample rate"):
        audio_stats(np.zeros((2, 4000), dtype=np.int16), 0)


# Model outputs


def test_prediction_entropy_and_margin() -> None:
    probabilities = np.array([[1, 0, 0, 0], [0.25, 0.25, 0.25, 0.25], [0.1, 0.7, 0.2, 0.0]], dtype=np.float32)
    stats = prediction_stats(probabilities)
    assert stats.entropy == pytest.approx(
        [0.0, np.log(4), -(0.1 * np.log(0.1) + 0.7 * np.log(0.7) + 0.2 * np.log(0.2))]
    )
    assert stats.top1_margin == pytest.approx([1.0, 0.0, 0.5])
    assert prediction_stats(np.ones((2, 1), dtype=np.float32)).item(0) == {"entropy": 0.0, "top1_margin": 1.0}


def test_prediction_statistics_of_a_batch_equal_those_of_each_row_alone() -> None:
    probabilities = np.random.default_rng(7).dirichlet(np.ones(5), size=20).astype(np.float32)
    stats = prediction_stats(probabilities)
    for index, p in enumerate(probabilities.astype(np.float64)):
        best, second = np.sort(p)[::-1][:2]
        expected = {"entropy": -np.sum(p * np.log(p)), "top1_margin": best - second}
        assert stats.item(index) == pytest.approx(expected, rel=1e-4, abs=1e-6)


# By modality


def test_the_modality_name_picks_the_statistics() -> None:
    assert isinstance(input_stats("frame", np.zeros((1, 8, 8, 3), dtype=np.uint8)), FrameStats)
    assert isinstance(input_stats("audio", np.zeros((1, 400), dtype=np.int16), sample_rate=SAMPLE_RATE), AudioStats)
    with pytest.raises(ValueError, match="sample rate"):
        input_stats("audio", np.zeros((1, 400), dtype=np.int16))
    with pytest.raises(ValueError, match="no input statistics for modality 'video'"):
        input_stats("video", np.zeros((1, 4, 4, 3), dtype=np.uint8))


def test_an_item_gives_the_names_a_result_record_carries() -> None:
    frame = input_stats("frame", np.zeros((1, 8, 8, 3), dtype=np.uint8)).item(0)
    audio = input_stats("audio", np.zeros((1, 400), dtype=np.int16), sample_rate=SAMPLE_RATE).item(0)
    # The names schemas/inference_result_v2.avsc documents for `input_stats`.
    assert list(frame) == ["brightness", "contrast", "colourfulness", "sharpness"]
    assert list(audio) == ["rms_dbfs", "zero_crossing_rate", "spectral_centroid_hz", "clipping_ratio"]
    assert all(type(value) is float for value in [*frame.values(), *audio.values()])


# The simulator's drift


def test_darker_frames_move_the_statistics_where_the_model_outputs_barely_move() -> None:
    # The same cameras and shapes, rendered with and without the simulator's darkening.
    frames, _ = frame_dataset(48, np.random.default_rng(11))
    darker, _ = frame_dataset(48, np.random.default_rng(11), brightness=SIM.drift_brightness)
    before, after = frame_stats(frames), frame_stats(darker)
    ratio = after.brightness / before.brightness
    assert np.all(np.abs(ratio - SIM.drift_brightness) < 0.05), "brightness scales with the darkening"
    assert np.all(after.contrast < 0.6 * before.contrast)
    assert np.all(after.colourfulness < 0.6 * before.colourfulness)
    assert np.all(after.sharpness < 0.6 * before.sharpness)

    # The bundled frame model standardises each image in its graph: darkening is invisible to it.
    engine = OnnxRuntimeEngine(ModelRepository(EngineSettings().model_repository).resolve("frame_classifier"))
    try:
        p_before, p_after = engine.infer(frames), engine.infer(darker)
    finally:
        engine.close()
    assert np.array_equal(p_before.argmax(axis=1), p_after.argmax(axis=1))
    assert np.max(np.abs(p_before - p_after)) < 0.02
    entropy_shift = np.abs(prediction_stats(p_after).entropy - prediction_stats(p_before).entropy)
    assert np.max(entropy_shift) < 0.05


def test_added_noise_raises_level_zero_crossings_and_centroid() -> None:
    # The same microphones and sound events, with and without the simulator's extra noise.
    chunks, _ = audio_dataset(64, np.random.default_rng(12))
    noisy, _ = audio_dataset(64, np.random.default_rng(12), extra_noise=SIM.drift_extra_noise)
    before, after = audio_stats(chunks, SAMPLE_RATE), audio_stats(noisy, SAMPLE_RATE)
    assert np.all(after.rms_dbfs > before.rms_dbfs), "independent noise adds power to every chunk"
    # Broadband noise pulls tones and low noises up; a chunk that was already broadband may move either
    # way, so the batch as a whole is what moves.
    assert np.mean(after.zero_crossing_rate - before.zero_crossing_rate) > 0.03
    assert np.mean(after.spectral_centroid_hz - before.spectral_centroid_hz) > 300
    assert np.mean(after.zero_crossing_rate > before.zero_crossing_rate) > 0.6
    assert np.mean(after.spectral_centroid_hz > before.spectral_centroid_hz) > 0.6


def test_the_worker_measures_frames_at_half_resolution() -> None:
    """What `input_stats` gives is `frame_stats` of every second pixel of every second row: close to full
    resolution for brightness and contrast, and the same for reference and current windows alike."""
    frames = np.random.default_rng(3).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    half = input_stats("frame", frames)
    assert np.array_equal(half.brightness, frame_stats(frames[:, ::2, ::2]).brightness)
    assert np.allclose(half.brightness, frame_stats(frames).brightness, rtol=0.05)
