"""Python API: :func:`convert` runs load → transform → finetune → export → validate → report.

The output directory is written atomically: all files go to a hidden sibling directory that is renamed to
``out_dir`` only when every stage has finished, so a failed or interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import datetime
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from vitcompress.context import ConvertSettings, LogProgress, Progress, RunContext
from vitcompress.errors import ModelError, OutputError
from vitcompress.models import resolve_name
from vitcompress.recipe import Recipe, dump_recipe, load_recipe
from vitcompress.stages import cascade, export, finetune, load, profile, report, transform, validate
from vitcompress.transforms import registry
from vitcompress.transforms.registry import TransformInputs

STAGES = (load, transform, finetune, export, validate, cascade, profile, report)


def machine_description() -> str:
    """CPU model and core count, for every reported latency."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads available"


def apply_recipe(
    model: nn.Module, recipe: Recipe | str | Path, calibration_batches: Callable[[], Iterable[torch.Tensor]] | None = None
) -> list[list[str]]:
    """Apply the recipe's transform steps to ``model`` in place; returns the converted module names per step."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)

    def no_calibration() -> Iterable[torch.Tensor]:
        raise ValueError("this recipe needs calibration images: pass calibration_batches")

    inputs = TransformInputs(calibration_batches=calibration_batches or no_calibration)
    return [registry.get(step.transform).apply(model, step, inputs) for step in recipe.steps]


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not force:
        raise OutputError(f"output directory {out_dir} exists: pass --force to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output path {out_dir} exists and is not a directory")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out_dir.parent}: {exc.strerror}") from None


def convert(
    model: str | None,
    recipe: str | Path | Recipe,
    out_dir: str | Path = "runs/latest",
    *,
    checkpoint: str | Path | None = None,
    data: str | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    random_init: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Convert ``model`` with ``recipe``; writes the bundle to ``out_dir`` and returns the report.

    A failed validation gate does not raise: the bundle is written and ``report["failed_gates"]`` lists it.
    Bad input raises a :class:`~vitcompress.errors.VitCompressError` before anything is written.
    """
    recipe_source = str(recipe) if not isinstance(recipe, Recipe) else "(in memory)"
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    name = model or recipe.model
    if name is None:
        raise ModelError("no model given: name one (e.g. vit_fmnist, deit_s) or set `model:` in the recipe")
    resolve_name(name)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, force)
    settings = ConvertSettings(model=name, out_dir=out_dir, checkpoint=Path(checkpoint) if checkpoint else None,
                               data=data, force=force, random_init=random_init)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    work_dir.chmod(0o755)
    scratch_dir = Path(tempfile.mkdtemp(prefix="vitcompress-"))
    ctx = RunContext(settings=settings, recipe=recipe, work_dir=work_dir, scratch_dir=scratch_dir,
                     progress=progress or LogProgress())
    ctx.report.update(recipe=recipe_source, date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                      machine=machine_description(),
                      versions={"torch": torch.__version__, "onnxruntime": _version("onnxruntime"),
                                "timm": _version("timm"), "onnx": _version("onnx")})
    try:
        (work_dir / "recipe.resolved.yaml").write_text(dump_recipe(recipe))
        for stage in STAGES:
            stage.run(ctx)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        work_dir.rename(out_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        shutil.rmtree(scratch_dir, ignore_errors=True)
    return ctx.report


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
