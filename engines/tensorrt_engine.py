"""TensorRT engine (TensorRT 10): a plan built from model.onnx for this GPU, run with `execute_async_v3`.

The plan is built once per GPU model, TensorRT version, precision and batch profile, and saved beside
the model as model.plan, with what it was built for in model.plan.json; a later start whose
key differs rebuilds it (and a plan shipped without that file is trusted as it is). The builder's
timing cache is kept beside it too (model.timing.cache), which turns a rebuild's minutes of kernel
timing into seconds. A read-only repository still works: the plan is then rebuilt at every start.

Device memory is torch's: the engine's input and output are CUDA tensors whose addresses are handed to
TensorRT once, batches go through pinned host buffers, and everything runs on the engine's own stream.
`tensorrt` and torch are imported when an engine is made, never at import time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Device, Engine, EngineError, EngineUnavailable
from engines.repository import ModelSpec, Precision
from engines.torch_engine import import_torch
from schemas.errors import ConfigError

log = logging.getLogger(__name__)

PLAN = "model.plan"
PLAN_KEY = "model.plan.json"
TIMING_CACHE = "model.timing.cache"
_WORKSPACE_BYTES = 4 << 30  # the builder's scratch space for trying tactics; more lets it try larger ones


def import_tensorrt() -> Any:
    """tensorrt, or EngineUnavailable naming the package to install."""
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineUnavailable(
            "the tensorrt engine needs the tensorrt package (NVIDIA's TensorRT 10, on a host with a CUDA GPU): "
            "pip install 'sluice[tensorrt]', or use kind=onnxruntime or kind=torch"
        ) from exc
    return tensorrt


class TensorRTEngine(Engine):
    kind = "tensorrt"

    def __init__(self, spec: ModelSpec, device: Device = "cuda", precision: Precision = "fp32") -> None:
        super().__init__(spec)
        if device != "cuda":
            raise ConfigError(f"the tensorrt engine runs on CUDA only, not {device}: set device=cuda")
        trt = import_tensorrt()
        torch = import_torch()
        if not torch.cuda.is_available():
            raise EngineUnavailable(f"the tensorrt engine needs a CUDA GPU, and torch {torch.__version__} sees none")
        self._torch = torch
        # Kept with the engine: TensorRT calls back into its logger for as long as the runtime lives.
        self._logger = trt.Logger(trt.Logger.WARNING)
        plan = plan_for(trt, self._logger, spec, precision, _device_key(torch))
        self._runtime: Any = trt.Runtime(self._logger)
        self._engine: Any = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise EngineError(f"TensorRT {trt.__version__} could not load the plan of {spec.name} (see its log)")
        self._context: Any = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [name for name in names if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
        outputs = [name for name in names if name not in inputs]
        if inputs != [self.input.name] or outputs != [self.output.name]:
            raise EngineError(
                f"the plan of {spec.name} has inputs {inputs} and outputs {outputs}; config.json names "
                f"{self.input.name!r} and {self.output.name!r}"
            )
        input_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self.input.name)))
        if np.dtype(trt.nptype(self._engine.get_tensor_dtype(self.output.name))) != np.float32:
            raise EngineError(f"the plan of {spec.name} does not output float32 {self.output.name!r}")
        # A batch larger than the profile's maximum goes through in slices.
        self._rows = int(self._engine.get_tensor_profile_shape(self.input.name, 0)[2][0])
        self._stream = torch.cuda.Stream()
        with torch.cuda.stream(self._stream):
            self._device_in = torch.empty(
                (self._rows, *self.input.shape), dtype=getattr(torch, input_dtype.name), device="cuda"
            )
            self._device_out = torch.empty((self._rows, *self.output.shape), dtype=torch.float32, device="cuda")
        # Staged in the plan's own input dtype: int16 audio is widened to int32 here (adapt_input_for_tensorrt).
        self._host_in = torch.zeros(tuple(self._device_in.shape), dtype=self._device_in.dtype, pin_memory=True)
        self._host_out = torch.zeros(tuple(self._device_out.shape), dtype=torch.float32, pin_memory=True)
        self._host_in_array, self._host_out_array = self._host_in.numpy(), self._host_out.numpy()
        for name, tensor in ((self.input.name, self._device_in), (self.output.name, self._device_out)):
            if not self._context.set_tensor_address(name, tensor.data_ptr()):
                raise EngineError(f"TensorRT refused the device buffer of {name!r}")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self._context is None:
            raise self._closed()
        batch = self._checked(batch)
        out = np.empty((len(batch), *self.output.shape), dtype=np.float32)
        try:
            for start in range(0, len(batch), self._rows):
                chunk = batch[start : start + self._rows]
                out[start : start + len(chunk)] = self._run(chunk)
        except EngineError:
            raise
        except Exception as exc:  # torch's copies raise RuntimeError, TensorRT's bindings their own
            raise EngineError(f"tensorrt failed on a batch of {len(batch)}: {exc}") from exc
        return out

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        n = len(chunk)
        self._host_in_array[:n] = chunk
        if not self._context.set_input_shape(self.input.name, (n, *self.input.shape)):
            raise EngineError(f"TensorRT refused a batch of {n} for {self.spec.name}")
        with self._torch.cuda.stream(self._stream):
            self._device_in[:n].copy_(self._host_in[:n], non_blocking=True)
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise EngineError(f"TensorRT failed to run a batch of {n} for {self.spec.name} (see its log)")
            self._host_out[:n].copy_(self._device_out[:n], non_blocking=True)
        # The pinned buffers are reused by the next batch, and the result is read on the host right after.
        self._stream.synchronize()
        return self._host_out_array[:n].copy()

    def close(self) -> None:
        if self._context is None:
            return
        self._stream.synchronize()
        # Context before engine before runtime: each was created from the next.
        self._context = None
        self._engine = None
        self._runtime = None
        del self._device_in, self._device_out, self._host_in, self._host_out
        del self._host_in_array, self._host_out_array, self._stream
        self._torch.cuda.empty_cache()
        self._torch.accelerator.empty_host_cache()


def plan_for(trt: Any, logger: Any, spec: ModelSpec, precision: Precision, device: dict[str, str]) -> bytes:
    """The serialized plan of `spec` for this GPU: model.plan when it was built for the same key, else built
    from model.onnx now and saved."""
    directory = spec.model_file("model.onnx", PLAN).parent  # ModelNotFound when the version has neither
    plan_path, onnx_path = directory / PLAN, directory / "model.onnx"
    if not onnx_path.is_file():
        log.info("%s: no model.onnx, running the shipped %s as it is", spec.name, PLAN)
        return plan_path.read_bytes()
    opt, largest = _profile(spec)
    key = {
        "onnx": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "tensorrt": trt.__version__,
        **device,
        "precision": precision,
        "batch": f"1/{opt}/{largest}",
    }
    key_path = directory / PLAN_KEY
    if plan_path.is_file():
        if not key_path.is_file():
            log.info("%s: running the shipped %s as it is (no %s beside it)", spec.name, PLAN, PLAN_KEY)
            return plan_path.read_bytes()
        if json.loads(key_path.read_text()) == key:
            return plan_path.read_bytes()
        log.info("%s: %s was built for another GPU, TensorRT, precision or profile; rebuilding", spec.name, PLAN)
    plan = build_plan(trt, logger, spec, onnx_path, precision, opt, largest, directory / TIMING_CACHE)
    try:
        _write_atomically(plan_path, plan)
        _write_atomically(key_path, (json.dumps(key, indent=2) + "\n").encode())
    except OSError as exc:
        log.warning("%s: could not save %s (%s); it will be rebuilt at every start", spec.name, plan_path, exc)
    return plan


def build_plan(
    trt: Any,
    logger: Any,
    spec: ModelSpec,
    onnx_path: Path,
    precision: Precision,
    opt: int,
    largest: int,
    timing_cache: Path,
) -> bytes:
    """Parse `onnx_path`, build a plan with one optimization profile (batch 1 / `opt` / `largest`) at
    `precision`, and keep the builder's timing cache in `timing_cache` for the next build."""
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10 networks are always explicit-batch
    parser = trt.OnnxParser(network, logger)
    model = adapt_input_for_tensorrt(onnx_path.read_bytes(), spec.input.name)
    if not parser.parse(model, str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, _WORKSPACE_BYTES)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    shape = tuple(spec.input.shape)
    profile = builder.create_optimization_profile()
    profile.set_shape(spec.input.name, (1, *shape), (opt, *shape), (largest, *shape))
    config.add_optimization_profile(profile)
    cached = timing_cache.read_bytes() if timing_cache.is_file() else b""
    if not config.set_timing_cache(config.create_timing_cache(cached), False):
        # A cache from another GPU or TensorRT version is refused; start an empty one.
        config.set_timing_cache(config.create_timing_cache(b""), False)
    log.info("%s: building a TensorRT %s plan (batch 1/%d/%d); this takes a while", spec.name, precision, opt, largest)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT could not build a plan from {onnx_path} (see its log)")
    try:
        _write_atomically(timing_cache, bytes(config.get_timing_cache().serialize()))
    except OSError as exc:
        log.warning("%s: could not save the timing cache %s (%s)", spec.name, timing_cache, exc)
    return bytes(plan)


# Ops that only move or relabel elements: on a wider copy of an integer input they give the same values.
_MOVEMENT_OPS = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})


def adapt_input_for_tensorrt(model: bytes, input_name: str) -> bytes:
    """`model` with its raw integer input made acceptable to every TensorRT 10.x:

    - int16, a type TensorRT lacks, is declared int32 (the host widens the batch; the values are the same);
    - uint8, which older TensorRT 10 releases (10.6 among them) let feed only a Cast, is cast to float32 first
      thing (the bundled frame model transposes its uint8 frames before casting them).

    Exact only when the input reaches its Casts through element-moving ops alone, which is checked. Other
    models are returned as they are. Needs the onnx package."""
    import onnx

    proto = onnx.load_from_string(model)
    (graph_input,) = [tensor for tensor in proto.graph.input if tensor.name == input_name]
    tensor_type = graph_input.type.tensor_type
    if tensor_type.elem_type not in (onnx.TensorProto.INT16, onnx.TensorProto.UINT8):
        return model
    moved = _moved_before_cast(proto.graph, input_name)
    if tensor_type.elem_type == onnx.TensorProto.INT16:
        tensor_type.elem_type = onnx.TensorProto.INT32
    elif moved:
        as_float = f"{input_name}_as_float"
        for node in proto.graph.node:
            node.input[:] = [as_float if name == input_name else name for name in node.input]
        cast = onnx.helper.make_node("Cast", [input_name], [as_float], to=onnx.TensorProto.FLOAT)
        proto.graph.node.insert(0, cast)
    else:
        return model  # uint8 straight into Casts: what every TensorRT 10 takes
    # The moved tensors' recorded types are the input's old one; TensorRT infers them again.
    kept = [info for info in proto.graph.value_info if info.name not in moved]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    return proto.SerializeToString()


def _moved_before_cast(graph: Any, input_name: str) -> set[str]:
    """The tensors between `input_name` and the Casts it reaches through `_MOVEMENT_OPS`, or EngineError
    when it reaches anything else, where a wider type could change the result."""
    moved: set[str] = set()
    frontier = [input_name]
    while frontier:
        tensor = frontier.pop()
        for node in graph.node:
            if tensor not in node.input or node.op_type == "Cast":
                continue
            if node.op_type not in _MOVEMENT_OPS or list(node.input).index(tensor) != 0:
                raise EngineError(
                    f"TensorRT takes input {input_name!r} only as a wider type, which is exact when the input "
                    f"is cast before any arithmetic; here it reaches a {node.op_type} first"
                )
            moved.update(node.output)
            frontier.extend(node.output)
    return moved


def _profile(spec: ModelSpec) -> tuple[int, int]:
    """(opt, max) batch of the optimization profile: TensorRT tunes its kernels for `opt`, the largest
    bucket when there are buckets, else the largest batch the worker sends."""
    largest = spec.batching.max_batch_size
    return max(spec.batching.preferred_batch_sizes, default=largest), largest


def _device_key(torch: Any) -> dict[str, str]:
    major, minor = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}


def _write_atomically(path: Path, data: bytes) -> None:
    """Written beside and renamed: two workers building at once, or a crash mid-write, never leave a torn file."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}-", delete=False) as f:
        temporary = Path(f.name)
        try:
            f.write(data)
        except BaseException:
            temporary.unlink()
            raise
    temporary.chmod(0o644)  # readable by workers running as other users, as the rest of the repository is
    os.replace(temporary, path)
