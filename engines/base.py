"""The engine interface every backend implements (ONNX Runtime now; torch and TensorRT next).

An engine takes one contiguous batch shaped `[N, *spec.input.shape]` with the
input's dtype and returns class probabilities `[N, len(spec.labels)]` as float32.
`infer` is blocking and is called from one worker thread at a time, so a backend
may keep per-session state (streams, pinned buffers) without locks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from engines.repository import ModelSpec
from schemas.errors import SluiceError


class EngineError(SluiceError, RuntimeError):
    """The engine failed on a batch. The worker retries the items one by one to find a poison input."""


class Engine(ABC):
    kind: str

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    @abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def warmup(self, max_batch_size: int) -> None:
        """Run every batch size once before taking traffic: the first call at a new
        size can stall (Triton #7776), and that stall would land in a p99."""
        item = np.zeros(self.spec.input.shape, dtype=self.spec.input.dtype)
        for size in range(1, max_batch_size + 1):
            self.infer(np.broadcast_to(item, (size, *item.shape)).copy())

    @abstractmethod
    def close(self) -> None:
        """Release the engine's memory. Idempotent."""
