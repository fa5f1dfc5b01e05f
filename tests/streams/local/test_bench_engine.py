"""`sluice bench engine` measures every cell it is asked for, and refuses an engine or device the host lacks in
one line with exit status 2. The figures themselves are not asserted (benchmark output on a shared machine)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import onnxruntime
import pytest
from rich.console import Console

from streams.local import bench_engine
from streams.settings import SluiceSettings


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    bench_engine.add_arguments(parser)
    return bench_engine.main(SluiceSettings(), parser.parse_args(argv), Console(width=160))


def test_every_cell_is_measured_for_raw_and_jpeg_frames(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    code = _run("--model", "frame_classifier", "--batch", "1,4", "--encoding", "raw,jpeg", "--seconds", "0.05",
                "--threads", "1", "--decode-threads", "2", "--json", str(out))  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert (report["model"], report["engine"], report["device"]) == ("frame_classifier v1", "onnxruntime", "cpu")
    cells = report["cells"]
    assert {(c["batch_size"], c["encoding"]) for c in cells} == {(1, "raw"), (4, "raw"), (1, "jpeg"), (4, "jpeg")}
    for cell in cells:
        assert cell["infer_items_per_s"] > 0 and cell["decode_infer_items_per_s"] > 0
        assert 0 < cell["infer_p50_ms"] <= cell["infer_p99_ms"]
        assert 0 < cell["decode_infer_p50_ms"] <= cell["decode_infer_p99_ms"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ["--engine", "tensorrt", "--device", "cuda"], "sluice[tensorrt]",
            marks=pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed"),
        ),
        pytest.param(
            ["--engine", "onnxruntime", "--device", "cuda"], "onnxruntime-gpu",
            marks=pytest.mark.skipif(
                "CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="onnxruntime-gpu is installed"
            ),
        ),
        (["--model", "no_such_model"], "no model 'no_such_model'"),
    ],
)  # fmt: skip
def test_what_the_host_lacks_is_one_line_and_exit_status_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert _run(*argv, "--seconds", "0.05") == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_batch_sizes_and_encodings_are_checked_as_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--batch", "0,4"], ["--batch", "one"], ["--encoding", "png"]):
        with pytest.raises(SystemExit):
            _run(*argv)
    assert "comma-separated" in capsys.readouterr().err
