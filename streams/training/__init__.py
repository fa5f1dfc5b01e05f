"""Training and ONNX export of the bundled models (needs the `train` extra: torch, onnx, onnxscript)."""
