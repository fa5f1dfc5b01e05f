"""torch engine: a `torch.export` program (model.pt2) or TorchScript (model.pt), on the CPU or CUDA.

torch is imported when an engine is made, never at import time: a worker without torch still
runs ONNX Runtime. (Not named `torch.py`: wherever engines/ itself is on sys.path, as when a script
in it runs, that file would be imported in place of the real torch.)

On CUDA a batch goes through pinned host buffers, so its copies are asynchronous DMA transfers, on
the engine's own stream, so it never queues behind another engine's work; and batches of a bucket size
(`batching.preferred_batch_sizes`) replay a CUDA graph captured on that bucket's first batch: one
launch instead of one per kernel, which is most of the time of a small model at a small batch.
A batch is padded up to its bucket; a batch no bucket holds runs eagerly. A batch already on the GPU
(`infer_device`: frames decoded by nvJPEG) takes the same path without the pinned staging copy.

fp16 and bf16 run under autocast, weights staying fp32: an exported graph casts its raw uint8 or
int16 input to float32 itself, so casting the weights instead (`module.half()`) would mix dtypes.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from engines.base import Device, Engine, EngineError, EngineUnavailable
from engines.repository import ModelSpec, Precision

if TYPE_CHECKING:
    import torch


def import_torch() -> Any:
    """torch, or EngineUnavailable naming the package to install."""
    try:
        import torch
    except ImportError as exc:
        raise EngineUnavailable(
            "the torch engine needs the torch package: pip install 'sluice[torch]' (or use kind=onnxruntime)"
        ) from exc
    return torch


class TorchEngine(Engine):
    kind = "torch"

    def __init__(
        self, spec: ModelSpec, device: Device = "cpu", precision: Precision = "fp32", intra_op_threads: int = 1
    ) -> None:
        super().__init__(spec)
        torch = import_torch()
        self._torch = torch
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineUnavailable(
                f"device cuda asked for, but torch {torch.__version__} sees no CUDA GPU (a CPU-only build, or no "
                "driver); set device=cpu"
            )
        if device == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise EngineUnavailable(f"{torch.cuda.get_device_name()} has no bf16; use precision fp16 or fp32")
        if device == "cpu":
            # torch's threads are per process, unlike ONNX Runtime's per session: the last engine loaded sets them.
            torch.set_num_threads(intra_op_threads)
        self._device = torch.device(device)
        self._autocast_dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        self._module: Callable[[torch.Tensor], Any] | None = _load(torch, spec, self._device)
        self._cuda = _CudaRunner(torch, spec, self._device, self._forward) if device == "cuda" else None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self._module is None:
            raise self._closed()
        batch = self._checked(batch)
        try:
            if self._cuda is not None:
                return self._cuda.infer(batch)
            if not batch.flags.writeable:  # torch tensors are always writable; it warns on sharing a read-only array
                batch = batch.copy()
            return self._forward(self._torch.from_numpy(batch)).numpy()
        except EngineError:
            raise
        except Exception as exc:  # torch raises RuntimeError, but an exported program's guards raise others
            raise EngineError(f"torch failed on a batch of {len(batch)}: {exc}") from exc

    def infer_device(self, batch: torch.Tensor) -> np.ndarray:
        """`infer` for a tensor already on this engine's device: on CUDA it is copied device to device into a
        bucket's graph input (or run eagerly), never staged through host memory."""
        if self._module is None:
            raise self._closed()
        batch = self._checked_tensor(batch)
        try:
            if self._cuda is not None:
                return self._cuda.infer_device(batch)
            return self._forward(batch).numpy()
        except EngineError:
            raise
        except Exception as exc:  # as in infer
            raise EngineError(f"torch failed on a device batch of {len(batch)}: {exc}") from exc

    def _checked_tensor(self, batch: torch.Tensor) -> torch.Tensor:
        """`batch` as a contiguous tensor, once it is known to match the declared input and to lie on this
        engine's device type: a CPU tensor given to a CUDA engine would be copied back silently."""
        torch = self._torch
        shape = tuple(self.input.shape)
        if (
            not isinstance(batch, torch.Tensor) or batch.device.type != self._device.type
            or batch.dtype != getattr(torch, self.input.dtype) or tuple(batch.shape[1:]) != shape or len(batch) == 0
        ):  # fmt: skip
            got = type(batch).__name__
            if isinstance(batch, torch.Tensor):
                got = f"{list(batch.shape)} {batch.dtype} on {batch.device}"
            raise EngineError(
                f"{self.spec.name} takes [N>=1, {', '.join(map(str, shape))}] {self.input.dtype} on "
                f"{self._device.type}, not {got}"
            )
        return batch.contiguous()

    @property
    def graph_buckets(self) -> list[int]:
        """The bucket sizes whose CUDA graph is captured, smallest first (none on the CPU)."""
        return sorted(self._cuda.graphs) if self._cuda is not None else []

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model on a batch already on the device: float32 probabilities `[N, *output.shape]`."""
        module = self._module
        if module is None:
            raise self._closed()
        with self._torch.inference_mode(), self._autocast():
            out = module(x)
        expected = [len(x), *self.output.shape]
        if not isinstance(out, self._torch.Tensor) or list(out.shape) != expected:
            got = list(out.shape) if isinstance(out, self._torch.Tensor) else type(out).__name__
            raise EngineError(f"{self.spec.name} returned {got}, not probabilities {expected}")
        return out.float()

    @contextlib.contextmanager
    def _autocast(self) -> Iterator[None]:
        if self._autocast_dtype is None:
            yield
            return
        # No cast cache: inside a CUDA graph capture a cached weight cast would be skipped on replay.
        with self._torch.autocast(self._device.type, dtype=self._autocast_dtype, cache_enabled=False):
            yield

    def close(self) -> None:
        if self._module is None:
            return
        self._module = None
        if self._cuda is not None:
            self._cuda.close()
            self._cuda = None


def _load(torch: Any, spec: ModelSpec, device: torch.device) -> Callable[[torch.Tensor], Any]:
    """The model's torch file on `device`: model.pt2 (preferred: torch.export is the supported format) or model.pt."""
    path = spec.model_file("model.pt2", "model.pt")
    try:
        if path.suffix == ".pt2":
            program = torch.export.load(path)
            if device.type != "cpu":
                # Moves parameters, buffers and constants, and rewrites device arguments inside the graph
                # (a bare module.to() would leave those on the CPU).
                program = torch.export.passes.move_to_device_pass(program, device)
            return program.module()
        module = torch.jit.load(path, map_location=device)
        return module.eval()
    except Exception as exc:  # each format raises its own errors on a bad file
        raise EngineError(f"torch could not load {path}: {exc}") from exc


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    input: torch.Tensor  # the static tensors the graph reads and writes on every replay
    output: torch.Tensor


class _CudaRunner:
    """Pinned host staging buffers, one CUDA stream, and a CUDA graph per bucket size."""

    def __init__(
        self, torch: Any, spec: ModelSpec, device: torch.device, forward: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        self._torch = torch
        self._spec = spec
        self._device = device
        self._forward = forward
        self._buckets = set(spec.batching.preferred_batch_sizes)
        # Buckets never exceed max_batch_size (Batching checks), so one buffer holds any bucket; a larger
        # batch goes through in slices.
        self._rows = spec.batching.max_batch_size
        self._input_dtype = getattr(torch, spec.input.dtype)
        self._host_in = torch.zeros((self._rows, *spec.input.shape), dtype=self._input_dtype, pin_memory=True)
        self._host_out = torch.zeros((self._rows, *spec.output.shape), dtype=torch.float32, pin_memory=True)
        self._host_in_array, self._host_out_array = self._host_in.numpy(), self._host_out.numpy()
        self._stream = torch.cuda.Stream(device)
        # One memory pool for every bucket's graph: replays never overlap (one stream, synchronised per batch)
        # and each graph keeps its own input and output alive, so a graph's intermediates may reuse another's.
        self._pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, _Graph] = {}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        out = np.empty((len(batch), *self._spec.output.shape), dtype=np.float32)
        for start in range(0, len(batch), self._rows):
            chunk = batch[start : start + self._rows]
            self._host_in_array[: len(chunk)] = chunk
            out[start : start + len(chunk)] = self._run(self._host_in[: len(chunk)])
        return out

    def infer_device(self, batch: torch.Tensor) -> np.ndarray:
        # The batch may still be being written on the calling thread's stream: the engine's stream waits for it.
        self._stream.wait_stream(self._torch.cuda.current_stream(self._device))
        out = np.empty((len(batch), *self._spec.output.shape), dtype=np.float32)
        for start in range(0, len(batch), self._rows):
            chunk = batch[start : start + self._rows]
            out[start : start + len(chunk)] = self._run(chunk)
        return out

    def _run(self, chunk: torch.Tensor) -> np.ndarray:
        """`chunk` (rows of the pinned staging buffer, or rows already on the device) through the model."""
        torch = self._torch
        n = len(chunk)
        bucket = self._spec.bucket_for(n)
        with torch.cuda.stream(self._stream):
            if bucket in self._buckets:
                captured = self.graphs.get(bucket) or self._capture(bucket)
                # Rows n..bucket keep an earlier batch's items: their outputs are computed and ignored.
                captured.input[:n].copy_(chunk, non_blocking=True)
                captured.graph.replay()
                result = captured.output[:n]
            else:
                result = self._forward(chunk.to(self._device, non_blocking=True))  # no copy for a device chunk
            self._host_out[:n].copy_(result, non_blocking=True)
        # The pinned buffers are reused by the next batch, and the result is read on the host right after.
        self._stream.synchronize()
        return self._host_out_array[:n].copy()

    def _capture(self, bucket: int) -> _Graph:
        """Capture the model at `bucket` rows, on the engine's stream (infer's context)."""
        torch = self._torch
        static_in = torch.zeros((bucket, *self._spec.input.shape), dtype=self._input_dtype, device=self._device)
        # cuDNN and cuBLAS pick algorithms and allocate workspaces on their first calls at a shape, which a
        # capture cannot record; run those calls first.
        for _ in range(2):
            self._forward(static_in)
        self._stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread_local: another engine's thread (the other modality) may run CUDA calls during this capture.
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
            static_out = self._forward(static_in)
        self.graphs[bucket] = _Graph(graph, static_in, static_out)
        return self.graphs[bucket]

    def close(self) -> None:
        torch = self._torch
        self._stream.synchronize()
        for captured in self.graphs.values():
            captured.graph.reset()
        self.graphs.clear()
        del self._host_in, self._host_out, self._host_in_array, self._host_out_array, self._pool, self._stream
        # An fx GraphModule sits in reference cycles: collect them, so its weights are free before the caches empty.
        gc.collect()
        # Return the freed device blocks and pinned pages to the driver, not only to torch's caching allocators.
        torch.cuda.empty_cache()
        torch.accelerator.empty_host_cache()
