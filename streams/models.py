"""`sluice models list|build|activate|deactivate|status`: the model repository and the plans in Redis.

The repository (`SLUICE_ENGINE__MODEL_REPOSITORY`) holds the versions; Redis holds
which version plays which role (`consumers/model_control.py`); each worker reports
what it actually serves, and why a version failed to load. These commands show the
three side by side and change the plans; the workers do the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
from pathlib import Path
from typing import get_args

from rich.console import Console
from rich.table import Table

from consumers.model_control import ModelControl, ModelControlUnavailable, ModelPlan, describe
from engines import ModelNotFound, ModelRepository
from engines.repository import Precision
from schemas.errors import ConfigError
from schemas.topics import MODALITY_NAMES
from streams.settings import SluiceSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every model and version in the repository, with its role")
    p = actions.add_parser("build", help="export a zoo network to ONNX (and a TensorRT plan) as a new version")
    p.add_argument("zoo", help="the zoo network: resnet18, resnet50 or audio_cnn (engines/zoo.py)")
    p.add_argument("--name", help="model name in the repository (default: the zoo name)")
    p.add_argument("--version", type=int, help="default: one above the newest")
    p.add_argument("--classes", type=int, help="output classes (default: the network's own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--repository", type=Path, help="default: SLUICE_ENGINE__MODEL_REPOSITORY")
    p.add_argument("--tensorrt", action="store_true", help="also build the TensorRT plan (needs TensorRT and a GPU)")
    p.add_argument("--precision", choices=get_args(Precision), default="fp16", help="of the TensorRT plan")
    for action, text in (("activate", "make a version serve"), ("deactivate", "take a version out of service")):
        p = actions.add_parser(action, help=text)
        p.add_argument("model", help="the model's name in the repository")
        p.add_argument("version", type=int, help="one of its version numbers (sluice models list)")
        if action == "activate":
            role = p.add_mutually_exclusive_group()
            role.add_argument("--canary", type=float, metavar="SHARE",
                              help="serve this share (0..1) of the devices, by a hash of device_id")
            role.add_argument("--shadow", type=float, metavar="SHARE",
                              help="mirror this share (0..1) of the batches; results to the shadow topic only")
    p = actions.add_parser("status", help="the plans, and what each worker serves or failed to load")
    p.add_argument("model", nargs="?", help="default: every model with a plan")


def main(settings: SluiceSettings, args: argparse.Namespace, console: Console) -> int:
    if args.action == "list":
        return _list(settings, console)
    if args.action == "build":
        return _build(settings, args, console)
    return asyncio.run(_with_control(settings, args, console))


def _list(settings: SluiceSettings, console: Console) -> int:
    repository = ModelRepository(settings.engine.model_repository)
    plans, note = asyncio.run(_plans_if_reachable(settings))
    table = Table("model", "version", "modality", "engine", "input", "checksum", "role", title=str(repository.root))
    names = sorted(p.name for p in repository.root.iterdir() if p.is_dir() and repository.versions(p.name))
    configured = {
        name: version or repository.versions(name)[-1]
        for name, version in map(settings.engine.model_for, MODALITY_NAMES) if repository.versions(name)
    }  # fmt: skip
    for name in names:
        plan = plans.get(name, ModelPlan(model=name))
        if plan.active is None and name in configured:  # what workers serve while no plan says otherwise
            plan.active = configured[name]
        for version in repository.versions(name):
            try:
                spec = repository.resolve(name, version)
            except ModelNotFound as exc:
                table.add_row(name, str(version), "", "", "", f"[red]{exc}[/]", plan.role_of(version))
                continue
            table.add_row(
                name, str(version), spec.modality, f"{spec.engine.kind} {spec.engine.precision}",
                f"{spec.input.dtype} {spec.input.shape}", (spec.checksum or "none")[:19], plan.role_of(version),
            )  # fmt: skip
    console.print(table)
    if note:
        console.print(note)
    return 0


async def _plans_if_reachable(settings: SluiceSettings) -> tuple[dict[str, ModelPlan], str]:
    control = ModelControl(settings.redis)
    try:
        return {plan.model: plan for plan in await control.plans()}, ""
    except ModelControlUnavailable as exc:
        return {}, f"[yellow]roles unknown:[/] {exc}"
    finally:
        await control.close()


def _build(settings: SluiceSettings, args: argparse.Namespace, console: Console) -> int:
    from engines.zoo import ZOO, write_zoo_model  # torch: only this command needs it

    if args.zoo not in ZOO:
        raise ConfigError(f"no zoo network {args.zoo!r}; the zoo has {', '.join(sorted(ZOO))}")
    root = args.repository or settings.engine.model_repository
    name = args.name or args.zoo
    version = args.version or max(ModelRepository(root).versions(name), default=0) + 1
    spec = write_zoo_model(args.zoo, root, version, classes=args.classes, seed=args.seed, model_name=name)
    console.print(f"built {name} v{version} in {spec.directory} ({spec.checksum})")
    if args.tensorrt:
        from engines.tensorrt_engine import TensorRTEngine

        # Building the engine builds and saves the plan for this GPU (model.plan, model.plan.json).
        TensorRTEngine(spec, device="cuda", precision=args.precision).close()
        console.print(f"TensorRT {args.precision} plan saved in {spec.directory}")
    return 0


async def _with_control(settings: SluiceSettings, args: argparse.Namespace, console: Console) -> int:
    control = ModelControl(settings.redis)
    try:
        if args.action == "status":
            await _status(control, args.model, console)
            return 0
        ModelRepository(settings.engine.model_repository).resolve(args.model, args.version)  # it must exist
        if args.action == "deactivate":
            plan = await control.deactivate(args.model, args.version)
        elif args.canary is not None:
            plan = await control.activate(args.model, args.version, "canary", _share(args.canary))
        elif args.shadow is not None:
            plan = await control.activate(args.model, args.version, "shadow", _share(args.shadow))
        else:
            plan = await control.activate(args.model, args.version)
        console.print(describe(plan))
        return 0
    finally:
        await control.close()


def _share(value: float) -> float:
    if not 0 < value <= 1:
        raise ConfigError(f"a share is a fraction in (0, 1], not {value}")
    return value


async def _status(control: ModelControl, model: str | None, console: Console) -> None:
    plans = [await control.plan(model)] if model else await control.plans()
    if not plans:
        console.print("no model plans yet: every worker serves its configured version")
    for plan in plans:
        console.print(describe(plan))
        table = Table("worker", "modality", "serving", "revision", "last failure")
        for status in await control.statuses(plan.model):
            failure = ""
            if status.failed_version is not None:
                when = dt.datetime.fromtimestamp(status.failed_at or 0, dt.UTC).strftime("%H:%M:%S")
                failure = f"v{status.failed_version} at {when}: {status.failed_reason}"
            serving = ", ".join(f"{role} v{version}" for role, version in status.serving.items())
            behind = "" if status.applied_revision == plan.revision else " [yellow](behind)[/]"
            table.add_row(status.worker_id, status.modality, serving, f"{status.applied_revision}{behind}", failure)
        console.print(table)
