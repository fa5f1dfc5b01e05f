"""JPEG frames decoded on the GPU by nvJPEG (through NVIDIA nvImageCodec), for the torch engine on CUDA.

A batch is first checked on the host exactly as the CPU decoder checks it (`FrameDecoder`: the Avro
read, the device identity, the JPEG header and the pixel limit, before any pixel is decoded). Then
every JPEG of the batch is decoded in one nvImageCodec call, resized bilinearly on the GPU and written
into one uint8 CUDA tensor `[N, H, W, 3]`: the engine's input layout (frames stay NHWC uint8; scaling
happens inside the model graph), which `Engine.infer_device` takes without a host copy.

A payload nvJPEG does not decode is decoded again on the CPU by `FrameDecoder`: libjpeg-turbo reads
some JPEGs nvJPEG refuses (arithmetic coding, unusual sampling), and a payload that neither decodes
fails with the CPU decoder's `InvalidInput`, so it is dead-lettered with the same stage and reason on
either path. RAW frames in a batch are decoded on the host and copied up.

torch and nvImageCodec are imported when a decoder is made, never at import time: a host without them
(or without a GPU) runs the CPU path, and `GpuFrameDecoder` says what to install.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from consumers.decode import DEFAULT_MAX_FRAME_PIXELS, FrameDecoder
from engines.base import EngineUnavailable
from engines.repository import ModelSpec
from schemas.codec import Codec
from schemas.records import FrameChunk
from schemas.topics import FRAME

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(slots=True)
class DeviceBatch:
    records: list[FrameChunk]  # of the inputs that decoded, in input order, their payloads dropped
    positions: list[int]  # index in `values` of each decoded input
    batch: torch.Tensor  # [len(records), H, W, 3] uint8 on the GPU, contiguous, ready on any stream
    failures: list[tuple[int, Exception]]  # index in `values`, and why that input did not decode


def import_gpu_decode() -> tuple[Any, Any]:
    """torch and nvidia.nvimgcodec, or EngineUnavailable naming the extra to install."""
    try:
        import torch
        from nvidia import nvimgcodec
    except ImportError as exc:
        raise EngineUnavailable(
            f"GPU JPEG decode needs torch and NVIDIA nvImageCodec (nvidia-nvimgcodec-cu12), which this host cannot "
            f"import ({exc}): pip install 'sluice[gpu-decode]' on a CUDA host, or decode on the CPU"
        ) from exc
    return torch, nvimgcodec


class GpuFrameDecoder:
    """Decodes a batch of frames into one CUDA tensor. Blocking: call it from one thread at a time (the
    thread that runs the batch's engine, or a decode thread of its own)."""

    def __init__(self, spec: ModelSpec, codec: Codec, max_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> None:
        if spec.modality != FRAME.name or spec.input.dtype != "uint8" or spec.input.shape[2:] != [3]:
            raise ValueError(f"model {spec.name} takes no uint8 RGB frames: GPU decode makes nothing else")
        torch, nvimgcodec = import_gpu_decode()
        if not torch.cuda.is_available():
            raise EngineUnavailable(
                f"GPU JPEG decode asked for, but torch {torch.__version__} sees no CUDA GPU (a CPU-only build, or "
                "no driver); decode on the CPU"
            )
        self.spec = spec
        self.host = FrameDecoder(spec, codec, max_pixels)  # the checks, RAW frames, and what nvJPEG refuses
        self.height, self.width, _ = spec.input.shape
        self._torch = torch
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(self._device)
        try:
            self._decoder: Any = nvimgcodec.Decoder(device_id=self._device.index)
        except Exception as exc:  # nvImageCodec raises its own errors (no nvJPEG library, a driver too old)
            raise EngineUnavailable(f"nvImageCodec could not start a decoder on {self._device}: {exc}") from exc
        # sRGB output (the default color_spec) gives three channels for a grayscale JPEG too. EXIF orientation
        # is not applied: the CPU decoder ignores it as well, and a camera's frames come as its sensor reads them.
        self._params = nvimgcodec.DecodeParams(apply_exif_orientation=False)

    def decode(self, values: Sequence[bytes | None]) -> DeviceBatch:
        if self._decoder is None:
            raise RuntimeError(f"the GPU frame decoder of {self.spec.name} is closed")
        records: dict[int, FrameChunk] = {}
        jpegs: dict[int, bytes] = {}  # checked JPEG payloads, by position, for nvJPEG
        on_host: dict[int, np.ndarray] = {}  # items decoded on the CPU, by position
        failures: list[tuple[int, Exception]] = []
        for position, value in enumerate(values):
            try:
                record, data = self.host.read(value)
                if record.encoding == "JPEG":
                    self.host.jpeg_size(data)
                    jpegs[position] = data
                else:
                    on_host[position] = self._on_host(record, data)
                records[position] = record
            except Exception as exc:  # whatever one input raises is that input's failure, not the batch's
                failures.append((position, exc))
        torch = self._torch
        with torch.cuda.stream(self._stream):
            on_device = self._nvjpeg(jpegs)
            for position in jpegs.keys() - on_device.keys():
                try:
                    on_host[position] = self._on_host(records[position], jpegs[position])
                except Exception as exc:  # as above
                    failures.append((position, exc))
                    del records[position]
            positions = sorted(records)
            row_of = {position: row for row, position in enumerate(positions)}
            batch = torch.empty((len(positions), self.height, self.width, 3), dtype=torch.uint8, device=self._device)
            self._resize_into(batch, [(row_of[position], image) for position, image in on_device.items()])
            if on_host:
                rows = torch.tensor([row_of[position] for position in on_host], device=self._device)
                batch.index_copy_(0, rows, torch.from_numpy(np.stack(list(on_host.values()))).to(self._device))
        # Ready when returned: the engine runs it on a stream of its own, from another thread.
        self._stream.synchronize()
        return DeviceBatch([records[p] for p in positions], positions, batch, sorted(failures, key=lambda f: f[0]))

    def _nvjpeg(self, jpegs: dict[int, bytes]) -> dict[int, torch.Tensor]:
        """The JPEGs nvJPEG decodes, by position, as [h, w, 3] uint8 CUDA tensors, all in one batched call."""
        if not jpegs:
            return {}
        try:
            images = self._decoder.decode(
                list(jpegs.values()), params=self._params, cuda_stream=self._stream.cuda_stream
            )
        except Exception as exc:  # not one input's fault, or not known to be: the CPU decodes them all instead
            log.warning("nvImageCodec failed on a batch of %d JPEGs (%s); decoding them on the CPU", len(jpegs), exc)
            return {}
        # A JPEG nvJPEG cannot decode comes back as None, and goes to the CPU.
        return {
            position: self._torch.as_tensor(image, device=self._device)
            for position, image in zip(jpegs, images, strict=True)
            if image is not None
        }

    def _on_host(self, record: FrameChunk, data: bytes) -> np.ndarray:
        item = np.empty(self.spec.input.shape, dtype=np.uint8)
        self.host.payload_into(record, data, item)
        return item

    def _resize_into(self, batch: torch.Tensor, images: list[tuple[int, torch.Tensor]]) -> None:
        """Each (row, [h, w, 3] image) into its row of `batch`, resized bilinearly to the model's input size:
        one interpolation per source size, so a fleet of cameras of one resolution costs one call."""
        torch = self._torch
        by_size: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = defaultdict(list)
        for row, image in images:
            by_size[(image.shape[0], image.shape[1])].append((row, image))
        for size, group in by_size.items():
            rows = torch.tensor([row for row, _ in group], device=self._device)
            frames = torch.stack([image for _, image in group])
            if size != (self.height, self.width):
                # Bilinear on the GPU needs floats. antialias=True filters a downscale as PIL's bilinear resize
                # (the CPU path) does, rather than sampling four pixels and aliasing.
                scaled = torch.nn.functional.interpolate(
                    frames.permute(0, 3, 1, 2).float(), size=(self.height, self.width), mode="bilinear",
                    align_corners=False, antialias=True,
                )  # fmt: skip
                frames = scaled.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            batch.index_copy_(0, rows, frames)

    def close(self) -> None:
        """Release nvImageCodec's decoder (its device buffers go with it). Idempotent."""
        self._decoder = None
