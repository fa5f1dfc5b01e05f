"""Synthetic cameras and microphones with known ground truth.

The fleet simulator publishes what these scenes render, and the training script
(`streams/training/train.py`) learns from the same generators, so the bundled
models' accuracy can be measured on fresh data at any time.

Frames: one moving shape of a known class (circle, square, triangle, cross) on a
camera-specific background (solid, gradient, stripes or blotchy texture).
Audio: 250 ms chunks of a tone, a chirp or a noise of a known class, over a
microphone-specific noise floor.

Drift is a pair of knobs applied at render time: `brightness` (< 1 darkens the
frame) and `extra_noise` (adds broadband noise to the audio, as a fraction of
full scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAME_LABELS: tuple[str, ...] = ("circle", "square", "triangle", "cross")
AUDIO_LABELS: tuple[str, ...] = ("tone", "chirp", "noise")

FRAME_HEIGHT = 224
FRAME_WIDTH = 224
SAMPLE_RATE = 16_000
CHUNK_SAMPLES = 4_000  # 250 ms at 16 kHz

_BACKGROUND_STYLES = ("solid", "gradient", "stripes", "texture")


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _contrasting_color(rng: np.random.Generator, against: np.ndarray) -> np.ndarray:
    """A color whose luminance differs clearly from the background's mean, so the
    class is visible to a human (and learnable) on every background."""
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    target = float(against @ luma)
    for _ in range(64):
        color = _random_color(rng)
        if abs(float(color @ luma) - target) >= 70:
            return color
    return np.full(3, 255.0 if target < 128 else 0.0, dtype=np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    style = _BACKGROUND_STYLES[int(rng.integers(len(_BACKGROUND_STYLES)))]
    a, b = _random_color(rng), _random_color(rng)
    if style == "solid":
        img = np.broadcast_to(a, (height, width, 3)).copy()
    elif style == "gradient":
        horizontal = rng.random() < 0.5
        t = np.linspace(0.0, 1.0, width if horizontal else height, dtype=np.float32)
        ramp = (1 - t)[:, None] * a + t[:, None] * b
        ramp = ramp[None, :, :] if horizontal else ramp[:, None, :]
        img = np.broadcast_to(ramp, (height, width, 3)).copy()
    elif style == "stripes":
        period = rng.uniform(12, 48)
        angle = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period)
        t = (0.5 + 0.5 * np.sin(phase))[..., None] * 0.5  # mild stripes: the shape stays the salient thing
        img = (1 - t) * a + t * b
    else:  # blotchy low-frequency texture
        coarse = rng.uniform(0, 1, size=(7, 7, 1)).astype(np.float32)
        t = np.kron(coarse, np.ones((height // 7 + 1, width // 7 + 1, 1), dtype=np.float32))
        t = t[:height, :width] * 0.6
        img = (1 - t) * a + t * b
    return img.astype(np.float32)


def _shape_mask(label: str, u: np.ndarray, v: np.ndarray, size: float) -> np.ndarray:
    """Membership of rotated, centred coordinates (u, v) in a shape of half-size `size`."""
    if label == "circle":
        return u * u + v * v <= size * size
    if label == "square":
        return (np.abs(u) <= size * 0.8) & (np.abs(v) <= size * 0.8)
    if label == "cross":
        arm = size * 0.3
        return ((np.abs(u) <= size) & (np.abs(v) <= arm)) | ((np.abs(v) <= size) & (np.abs(u) <= arm))
    if label == "triangle":
        # Equilateral triangle with circumradius `size`: inside when on the inner side of all three edges.
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            angle = np.pi / 2 + k * 2 * np.pi / 3
            nx, ny = np.cos(angle + np.pi), np.sin(angle + np.pi)  # inward normal of the edge opposite vertex k
            inside &= u * nx + v * ny <= size * 0.5
        return inside
    raise ValueError(f"unknown frame label {label!r}")


@dataclass
class _MovingShape:
    label: str
    color: np.ndarray
    size: float
    x: float
    y: float
    vx: float
    vy: float
    angle: float
    spin: float


class CameraScene:
    """One camera: a fixed background with one moving, spinning shape.

    The shape's class changes every `mean_dwell_frames` frames on average, as if
    objects walk through the field of view.
    """

    def __init__(
        self,
        rng: np.random.Generator,
        height: int = FRAME_HEIGHT,
        width: int = FRAME_WIDTH,
        mean_dwell_frames: int = 30,
    ) -> None:
        self._rng = rng
        self.height, self.width = height, width
        self._mean_dwell = mean_dwell_frames
        self._background = _background(rng, height, width)
        self._background_mean = self._background.reshape(-1, 3).mean(axis=0)
        self._shape = self._new_shape()

    def _new_shape(self) -> _MovingShape:
        rng = self._rng
        size = float(rng.uniform(18, 40))
        speed = rng.uniform(1.0, 6.0)
        heading = rng.uniform(0, 2 * np.pi)
        return _MovingShape(
            label=FRAME_LABELS[int(rng.integers(len(FRAME_LABELS)))],
            color=_contrasting_color(rng, self._background_mean),
            size=size,
            x=float(rng.uniform(size, self.width - size)),
            y=float(rng.uniform(size, self.height - size)),
            vx=float(speed * np.cos(heading)),
            vy=float(speed * np.sin(heading)),
            angle=float(rng.uniform(0, 2 * np.pi)),
            spin=float(rng.uniform(-0.1, 0.1)),
        )

    def _advance(self) -> None:
        s = self._shape
        s.x += s.vx
        s.y += s.vy
        if not s.size <= s.x <= self.width - s.size:
            s.vx = -s.vx
            s.x = float(np.clip(s.x, s.size, self.width - s.size))
        if not s.size <= s.y <= self.height - s.size:
            s.vy = -s.vy
            s.y = float(np.clip(s.y, s.size, self.height - s.size))
        s.angle += s.spin
        if self._rng.random() < 1.0 / self._mean_dwell:
            self._shape = self._new_shape()

    def next_frame(self, brightness: float = 1.0) -> tuple[np.ndarray, str]:
        """Render the next frame as uint8 HxWx3 RGB, and return it with its label."""
        self._advance()
        s = self._shape
        img = self._background.copy()
        r = int(np.ceil(s.size)) + 1
        y0, y1 = max(0, int(s.y) - r), min(self.height, int(s.y) + r + 1)
        x0, x1 = max(0, int(s.x) - r), min(self.width, int(s.x) + r + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dx, dy = xx - s.x, yy - s.y
        cos, sin = np.cos(s.angle), np.sin(s.angle)
        u, v = dx * cos + dy * sin, -dx * sin + dy * cos
        mask = _shape_mask(s.label, u, v, s.size)
        img[y0:y1, x0:x1][mask] = s.color
        if brightness != 1.0:
            img *= brightness
        return np.clip(img, 0, 255).astype(np.uint8), s.label


class MicrophoneScene:
    """One microphone: a sequence of sound events over a per-device noise floor."""

    def __init__(
        self,
        rng: np.random.Generator,
        sample_rate: int = SAMPLE_RATE,
        chunk_samples: int = CHUNK_SAMPLES,
        mean_dwell_chunks: int = 6,
    ) -> None:
        self._rng = rng
        self.sample_rate = sample_rate
        self.chunk_samples = chunk_samples
        self._mean_dwell = mean_dwell_chunks
        self._noise_floor = float(rng.uniform(0.002, 0.02))
        self._label = self._new_label()

    def _new_label(self) -> str:
        return AUDIO_LABELS[int(self._rng.integers(len(AUDIO_LABELS)))]

    def _event(self, label: str) -> np.ndarray:
        rng, n, sr = self._rng, self.chunk_samples, self.sample_rate
        t = np.arange(n, dtype=np.float64) / sr
        amplitude = rng.uniform(0.1, 0.7)
        if label == "tone":
            f = rng.uniform(200, 4000)
            wave = np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
            if rng.random() < 0.5:  # a harmonic, like a real buzzer or hum
                wave += rng.uniform(0.1, 0.4) * np.sin(4 * np.pi * f * t)
        elif label == "chirp":
            f0, octaves = rng.uniform(200, 1500), rng.uniform(1.5, 3.0)
            f1 = f0 * 2**octaves
            if rng.random() < 0.5:
                f0, f1 = f1, f0  # down-sweeps too
            duration = n / sr
            k = (f1 - f0) / duration
            wave = np.sin(2 * np.pi * (f0 * t + 0.5 * k * t * t))
        elif label == "noise":
            white = rng.standard_normal(n)
            colour = rng.integers(3)
            if colour == 1:  # brown-ish: integrated white noise, de-trended
                white = np.cumsum(white)
                white -= np.linspace(white[0], white[-1], n)
            elif colour == 2:  # band-limited: moving average
                width = int(rng.integers(2, 8))
                white = np.convolve(white, np.ones(width) / width, mode="same")
            wave = white
        else:
            raise ValueError(f"unknown audio label {label!r}")
        peak = float(np.max(np.abs(wave))) or 1.0
        return amplitude * wave / peak

    def next_chunk(self, extra_noise: float = 0.0) -> tuple[np.ndarray, str]:
        """Render the next chunk as mono int16 PCM, and return it with its label."""
        if self._rng.random() < 1.0 / self._mean_dwell:
            self._label = self._new_label()
        signal = self._event(self._label)
        noise_level = self._noise_floor + extra_noise
        signal += noise_level * self._rng.standard_normal(self.chunk_samples)
        pcm = np.clip(signal, -1.0, 1.0) * 32767.0
        return pcm.astype(np.int16), self._label


def frame_dataset(n: int, rng: np.random.Generator, brightness: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """n independent frames (each from a fresh camera) and their class indices."""
    x = np.empty((n, FRAME_HEIGHT, FRAME_WIDTH, 3), dtype=np.uint8)
    y = np.empty(n, dtype=np.int64)
    for i in range(n):
        scene = CameraScene(rng)
        for _ in range(int(rng.integers(0, 4))):
            scene.next_frame()
        frame, label = scene.next_frame(brightness=brightness)
        x[i], y[i] = frame, FRAME_LABELS.index(label)
    return x, y


def audio_dataset(n: int, rng: np.random.Generator, extra_noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """n independent audio chunks (each from a fresh microphone) and their class indices."""
    x = np.empty((n, CHUNK_SAMPLES), dtype=np.int16)
    y = np.empty(n, dtype=np.int64)
    for i in range(n):
        chunk, label = MicrophoneScene(rng).next_chunk(extra_noise=extra_noise)
        x[i], y[i] = chunk, AUDIO_LABELS.index(label)
    return x, y
