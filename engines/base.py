"""The engine interface every backend implements: ONNX Runtime, torch and TensorRT.

An engine takes one contiguous batch shaped `[N, *input.shape]` with the input's
dtype (the batch axis is dynamic) and returns class probabilities
`[N, *output.shape]` as float32; `input` and `output` are the model's declared
tensors (`ModelSpec`). `infer` is blocking and is called from one worker thread
at a time, so a backend may keep per-session state (streams, pinned buffers,
CUDA graphs) without locks.

`infer` takes a host array. `infer_device` takes a batch already on the engine's
device (frames decoded on the GPU), which a backend that supports it runs without
the host-to-device copy; the others say they cannot.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self

import numpy as np

from engines.repository import ModelSpec, TensorSpec
from schemas.errors import SluiceError

if TYPE_CHECKING:
    import torch

Device = Literal["cpu", "cuda"]


class EngineError(SluiceError, RuntimeError):
    """The engine failed on a batch. The worker retries the items one by one to find a poison input."""


class EngineUnavailable(SluiceError, RuntimeError):
    """The engine or device asked for cannot run on this host: its package is not installed, or there is no GPU."""


class Engine(ABC):
    kind: str

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    @property
    def input(self) -> TensorSpec:
        return self.spec.input

    @property
    def output(self) -> TensorSpec:
        return self.spec.output

    @abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def infer_device(self, batch: torch.Tensor) -> np.ndarray:
        """`infer` for a batch already on the engine's device: a torch tensor shaped `[N, *input.shape]` with
        the input's dtype, such as frames decoded on the GPU. A backend that supports it skips the host
        staging copy; this one takes host arrays only."""
        raise EngineUnavailable(
            f"the {self.kind} engine takes host arrays, not a batch on a device (use the torch engine on cuda)"
        )

    def warmup(self, sizes: Iterable[int] | int) -> None:
        """Run every batch size in `sizes` once before taking traffic: the first call at a new size can
        stall (Triton #7776), and that stall would land in a p99. An int n means every size 1..n, what a
        worker that does not pad sends. Engines with fixed shapes pad a size to its bucket, so warming
        a size prepares its bucket. Largest first, so that buckets prepared later can reuse its memory."""
        wanted = range(1, sizes + 1) if isinstance(sizes, int) else sizes
        for size in sorted(set(wanted), reverse=True):
            self.infer(self.blank(size))

    def blank(self, size: int) -> np.ndarray:
        """An all-zero batch of `size` items: what warm-up runs."""
        return np.zeros((size, *self.input.shape), dtype=self.input.dtype)

    @abstractmethod
    def close(self) -> None:
        """Release everything the engine holds, host and device memory alike. Idempotent; `infer` then raises."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _closed(self) -> EngineError:
        return EngineError(f"the {self.kind} engine of {self.spec.name} v{self.spec.version} is closed")

    def _checked(self, batch: np.ndarray) -> np.ndarray:
        """`batch` as a contiguous array, once it is known to match the declared input: a backend given
        another dtype may cast silently (torch) or fail deep inside with an unrelated message."""
        shape = tuple(self.input.shape)
        if batch.dtype != np.dtype(self.input.dtype) or batch.shape[1:] != shape or len(batch) == 0:
            raise EngineError(
                f"{self.spec.name} takes [N>=1, {', '.join(map(str, shape))}] {self.input.dtype}, "
                f"not {list(batch.shape)} {batch.dtype}"
            )
        return np.ascontiguousarray(batch)
