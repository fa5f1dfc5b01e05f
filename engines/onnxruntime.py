"""ONNX Runtime engine: the default, CPU path. Needs only the onnxruntime wheel."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from engines.base import Engine, EngineError
from engines.repository import ModelNotFound, ModelSpec


class OnnxRuntimeEngine(Engine):
    kind = "onnxruntime"

    def __init__(self, spec: ModelSpec, intra_op_threads: int = 1) -> None:
        super().__init__(spec)
        if spec.path is None:
            raise ModelNotFound(f"model {spec.name} v{spec.version} has no file path")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session: ort.InferenceSession | None = ort.InferenceSession(
            str(spec.path), sess_options=options, providers=["CPUExecutionProvider"]
        )

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self._session is None:
            raise EngineError("engine is closed")
        try:
            (probabilities,) = self._session.run([self.spec.output.name], {self.spec.input.name: batch})
        except Exception as exc:  # ORT raises several unrelated exception types
            raise EngineError(f"onnxruntime failed on a batch of {len(batch)}: {exc}") from exc
        return np.asarray(probabilities, dtype=np.float32)

    def close(self) -> None:
        self._session = None
