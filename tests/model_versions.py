"""A model repository of the bundled frame classifier's versions, good and broken, for the lifecycle tests.

Every good version is the bundled model under another version number (so results tell versions apart by
`model_version` alone). The broken ones fail where a real bad release fails:

- "corrupt": model.onnx is not an ONNX file (a truncated upload), so the engine cannot load it;
- "tampered": model.onnx differs from config.json's checksum, so the repository refuses it;
- "other_input": config.json declares another input shape than the serving version, so the worker refuses it
  before loading (its decoder builds inputs for the old shape);
- "wrong_graph": the graph takes 112x112 frames while config.json says 224x224, so it loads and fails on its
  first warm-up batch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import numpy as np

from engines.repository import model_checksum
from engines.settings import BUNDLED_MODELS

Kind = Literal["good", "corrupt", "tampered", "other_input", "wrong_graph"]
MODEL = "frame_classifier"


def add_version(root: Path, version: int, kind: Kind = "good") -> Path:
    """Write version `version` of the frame classifier into the repository at `root`."""
    source = BUNDLED_MODELS / MODEL / "1"
    target = root / MODEL / str(version)
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["version"] = version
    if kind == "corrupt":
        (target / "model.onnx").write_bytes(b"\x08\x07not an onnx graph: the upload stopped here")
    elif kind == "tampered":
        config["checksum"] = model_checksum(target)
        with (target / "model.onnx").open("ab") as f:
            f.write(b"\0")
    elif kind == "other_input":
        config["input"]["shape"] = [112, 112, 3]
    elif kind == "wrong_graph":
        _write_graph_for_112px(target / "model.onnx", len(config["labels"]))
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def repository(root: Path, versions: dict[int, Kind]) -> Path:
    for version, kind in versions.items():
        add_version(root, version, kind)
    return root


def _write_graph_for_112px(path: Path, classes: int) -> None:
    """frames uint8 [N, 112, 112, 3] -> probabilities: a mean and a softmax, with a static 112x112 shape."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.ones((3, classes), dtype=np.float32), "weights")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["frames"], ["as_float"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["as_float", "axes"], ["pooled"], keepdims=0),
            helper.make_node("MatMul", ["pooled", "weights"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "frames_112px",
        [helper.make_tensor_value_info("frames", TensorProto.UINT8, ["N", 112, 112, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        [weights, numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
