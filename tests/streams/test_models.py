"""`sluice models ...` on a repository of its own and the local stack's real redis-server."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from rich.console import Console

from consumers.model_control import ModelControl, WorkerModelStatus
from engines import ModelNotFound, ModelRepository
from schemas.errors import ConfigError
from streams import models
from streams.cli import build_parser
from streams.settings import SluiceSettings
from tests.model_versions import MODEL, repository

T = TypeVar("T")


def _run(settings: SluiceSettings, *argv: str) -> str:
    out = io.StringIO()
    args = build_parser().parse_args(["models", *argv])
    assert models.main(settings, args, Console(file=out, width=250)) == 0
    return out.getvalue()


@pytest.fixture
def with_versions(settings: SluiceSettings, tmp_path: Path) -> SluiceSettings:
    root = repository(tmp_path / "models", {1: "good", 2: "good", 3: "good"})
    return settings.model_copy(update={"engine": settings.engine.model_copy(update={"model_repository": root})})


def test_build_exports_a_zoo_network_as_the_next_version_with_checksum_and_recipe(tmp_path: Path) -> None:
    settings = SluiceSettings()
    root = tmp_path / "models"
    _run(settings, "build", "audio_cnn", "--name", "mic_cnn", "--classes", "4", "--repository", str(root))
    _run(settings, "build", "audio_cnn", "--name", "mic_cnn", "--classes", "4", "--repository", str(root), "--seed", "1")
    repo = ModelRepository(root)
    assert repo.versions("mic_cnn") == [1, 2]
    spec = repo.resolve("mic_cnn", 2)  # checks the recorded checksum against the files
    assert spec.checksum and spec.checksum.startswith("sha256:")
    assert spec.build["zoo"] == "audio_cnn" and spec.build["seed"] == 1 and "torch" in spec.build
    assert {p.name for p in spec.directory.iterdir()} >= {"model.onnx", "model.pt2", "config.json"}
    config = json.loads((spec.directory / "config.json").read_text())
    assert config["version"] == 2 and len(config["labels"]) == 4


def test_build_refuses_an_unknown_network(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="resnet18"):
        _run(SluiceSettings(), "build", "vgg16", "--repository", str(tmp_path))


def test_activate_canary_shadow_deactivate_and_status(with_versions: SluiceSettings) -> None:
    settings = with_versions
    listed = _run(settings, "list")
    assert "active" in listed, "with no plan, the configured version is shown as serving"
    assert "active v2" in _run(settings, "activate", MODEL, "2")
    assert "canary v3 on 20% of devices" in _run(settings, "activate", MODEL, "3", "--canary", "0.2")
    assert "shadow v1 on 50% of batches" in _run(settings, "activate", MODEL, "1", "--shadow", "0.5")
    plan = _control(settings, lambda control: control.plan(MODEL))
    assert (plan.active, plan.canary, plan.shadow, plan.revision) == (2, 3, 1, 3)
    assert plan.role_of(1) == "shadow" and plan.role_of(3) == "canary"
    report = WorkerModelStatus(
        worker_id="w1", model=MODEL, modality="frame", serving={"active": 2}, applied_revision=2,
        failed_version=3, failed_reason="EngineError: out of memory", failed_at=0.0,
    )  # fmt: skip
    _control(settings, lambda control: control.report(report, ttl_s=30))
    status = _run(settings, "status", MODEL)
    assert "w1" in status and "(behind)" in status and "v3 at" in status and "out of memory" in status
    assert "deprecated [1]" in _run(settings, "deactivate", MODEL, "1")
    _run(settings, "deactivate", MODEL, "2")
    plan = _control(settings, lambda control: control.plan(MODEL))
    assert plan.active is None, "deactivating the active version hands back to the configured one"
    assert plan.shadow is None and plan.canary == 3 and plan.deprecated == [1, 2]


def _control(settings: SluiceSettings, call: Callable[[ModelControl], Awaitable[T]]) -> T:
    async def run() -> T:
        control = ModelControl(settings.redis)
        try:
            return await call(control)
        finally:
            await control.close()

    return asyncio.run(run())


def test_activate_refuses_a_version_the_repository_lacks(with_versions: SluiceSettings) -> None:
    with pytest.raises(ModelNotFound, match="not 9"):
        _run(with_versions, "activate", MODEL, "9")


def test_a_share_outside_zero_to_one_is_refused(with_versions: SluiceSettings) -> None:
    with pytest.raises(ConfigError, match="share"):
        _run(with_versions, "activate", MODEL, "3", "--canary", "1.5")
