"""ONNX Runtime engine: the default, CPU path, and CUDA where `onnxruntime-gpu` is installed.

On CUDA the session keeps the CPU provider after the CUDA one, so the few ops the CUDA
provider lacks still run (on the host) instead of failing the model."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from engines.base import Device, Engine, EngineError, EngineUnavailable
from engines.repository import ModelSpec, Precision
from schemas.errors import ConfigError

_CUDA = "CUDAExecutionProvider"


class OnnxRuntimeEngine(Engine):
    kind = "onnxruntime"

    def __init__(
        self, spec: ModelSpec, intra_op_threads: int = 1, device: Device = "cpu", precision: Precision = "fp32"
    ) -> None:
        super().__init__(spec)
        if precision != "fp32":
            # ONNX Runtime runs the graph in the types it was exported with; it has no reduced-precision switch.
            raise ConfigError(
                f"onnxruntime runs {spec.name} in fp32 only, not {precision}; use the torch or tensorrt engine"
            )
        path = spec.model_file("model.onnx")
        providers: list[str] = ["CPUExecutionProvider"]
        if device == "cuda":
            if _CUDA not in ort.get_available_providers():
                raise EngineUnavailable(
                    f"device cuda needs onnxruntime-gpu (this onnxruntime has {ort.get_available_providers()}); "
                    "install sluice[onnxruntime-gpu] in place of onnxruntime, or set device=cpu"
                )
            providers.insert(0, _CUDA)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session: ort.InferenceSession | None = ort.InferenceSession(
            str(path), sess_options=options, providers=providers
        )
        # A CUDA provider that fails to initialise (no driver, a missing cuDNN) only logs and falls back to
        # the CPU: that would run silently slow, so it is refused here.
        if device == "cuda" and _CUDA not in self._session.get_providers():
            self._session = None
            raise EngineUnavailable(
                "onnxruntime-gpu could not start its CUDA provider (check the driver, CUDA and cuDNN versions)"
            )
        declared = {tensor.name for tensor in self._session.get_inputs()}
        if self.input.name not in declared:
            self._session = None
            raise EngineError(f"{path} takes {sorted(declared)}, but config.json names input {self.input.name!r}")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self._session is None:
            raise self._closed()
        batch = self._checked(batch)
        try:
            (probabilities,) = self._session.run([self.output.name], {self.input.name: batch})
        except Exception as exc:  # ORT raises several unrelated exception types
            raise EngineError(f"onnxruntime failed on a batch of {len(batch)}: {exc}") from exc
        return np.asarray(probabilities, dtype=np.float32)

    def close(self) -> None:
        self._session = None
